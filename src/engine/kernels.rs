//! Scalar kernels of the forward pass that round the way llama.cpp does: RMSNorm. (Q4_1
//! weights with llama.cpp's Q8_1 activations live in [`super::cpu::q4_1`].)

/// RMS normalization of `row` times `weight`, in place, rounded like llama.cpp's `rms_norm`
/// followed by `mul`: the sum of squares in f64, then `x · (1 / √(mean + ε)) · w` in f32.
/// Inputs of quantized matmuls are rounded to 8 bits next, so a last-bit difference here can
/// move a value across a rounding boundary.
pub fn rms_norm_row(row: &mut [f32], weight: &[f32], eps: f32) {
    let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / row.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &w) in row.iter_mut().zip(weight) {
        *v = (*v * scale) * w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_scales_rows_to_unit_rms_times_the_weight() {
        let mut a = [3f32, -4.0];
        rms_norm_row(&mut a, &[1.0, 2.0], 0.0);
        let rms = (12.5f32).sqrt();
        assert!((a[0] - 3.0 / rms).abs() < 1e-6);
        assert!((a[1] - 2.0 * -4.0 / rms).abs() < 1e-6);
        let mut b = [0.5f32, 0.5];
        rms_norm_row(&mut b, &[1.0, 2.0], 0.0);
        assert!((b[0] - 1.0).abs() < 1e-6 && (b[1] - 2.0).abs() < 1e-6);
    }
}
