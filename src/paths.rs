//! Where SmolDesk keeps its files: the models folder, conversations, the data directory.
