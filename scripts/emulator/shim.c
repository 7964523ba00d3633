/* The bochscpu-python 0.4.0 wheel was linked against glibc 2.38, whose headers turn strtoull and
 * sscanf into the C23 names below; older glibc (Debian 12 has 2.36) lacks them, so the extension
 * fails to load. These forwarders, preloaded with LD_PRELOAD, supply them. Harmless on newer glibc. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

unsigned long long __isoc23_strtoull(const char *s, char **end, int base) {
    return strtoull(s, end, base);
}

int __isoc23_sscanf(const char *s, const char *format, ...) {
    va_list args;
    va_start(args, format);
    int n = vsscanf(s, format, args);
    va_end(args);
    return n;
}
