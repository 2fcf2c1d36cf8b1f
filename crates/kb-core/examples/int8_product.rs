//! Times the f32 packed product ([`PackedWeight`]) against the int8 one ([`QuantizedWeight`])
//! and candle's own 8-bit product (`QMatMul` over `GgmlDType::Q8_0`) at decoding shapes,
//! cache-cold: every product of a pass reads a distinct weight (as the decoder's six layers do),
//! and the weights of a pass add up to more than the caches. Prints the median of the passes'
//! time per product.
//!
//! ```text
//! cargo run --release -p kb-core --example int8_product [-- PASSES]
//! KB_INT8_KERNEL=portable cargo run --release -p kb-core --example int8_product
//! ```
//!
//! Measured on 2 Zen 3 cores (AVX2 path; kb-core built with release settings) shared with other
//! work (load ≈ 3.5), 5 passes, ms per product (the ratios held in repeated runs; absolute times
//! moved by up to 50% with the load):
//!
//! ```text
//!            shape  rows       f32      int8      q8_0 f32/int8 q80/int8
//!          768→768     1     0.282     0.106     0.445     2.67     4.21
//!          768→768     5     0.366     0.126     2.640     2.91    21.01
//!          768→768    80     1.743     0.995    15.746     1.75    15.83
//!         768→3072     1     1.153     0.333     1.087     3.46     3.26
//!         768→3072     5     1.283     0.441     4.258     2.91     9.66
//!         768→3072    80     7.625     4.606    60.063     1.66    13.04
//!         3072→768     1     1.116     0.372     2.201     3.00     5.92
//!         3072→768     5     1.135     0.388     4.000     2.93    10.31
//!         3072→768    80     7.472     3.087    35.558     2.42    11.52
//!        768→30000     1     8.277     2.210     5.468     3.75     2.47
//!        768→30000     5    10.005     3.338    21.561     3.00     6.46
//!        768→30000    80    52.993    30.380   598.437     1.74    19.70
//! ```
//!
//! Warm (one weight, one thread, best of 31): the int8 AVX2 kernel runs 55–74 G multiply-adds/s
//! per core against 25–40 for the f32 one.

use std::time::Instant;

use kb_core::candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use kb_core::candle_core::{Device, Module, Result, Tensor};
use kb_core::model::packed::PackedWeight;
use kb_core::model::panel_product::KernelFamily;
use kb_core::model::quantized::{Int8Kernel, QuantizedWeight};

/// Bytes of f32 weights each pass reads at least (beyond any L3 cache).
const PASS_BYTES: usize = 256 << 20;

/// The median of `passes` timings of `pass`, in seconds per product (`products` per pass).
fn median(passes: usize, products: usize, mut pass: impl FnMut() -> Result<()>) -> Result<f64> {
    pass()?; // warm-up: page faults, thread pool
    let mut times = Vec::with_capacity(passes);
    for _ in 0..passes {
        let start = Instant::now();
        pass()?;
        times.push(start.elapsed().as_secs_f64() / products as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[passes / 2])
}

fn main() -> Result<()> {
    let passes: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(kb_core::candle_core::Error::wrap)?,
        None => 7,
    };
    let dev = Device::Cpu;
    println!(
        "int8 kernel: {}; {} threads; median of {passes} cache-cold passes, ms per product",
        Int8Kernel::selected()?.name(),
        rayon::current_num_threads()
    );
    println!(
        "{:>16} {:>5} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "shape", "rows", "f32", "int8", "q8_0", "f32/int8", "q80/int8"
    );
    for (inputs, outputs) in [(768, 768), (768, 3072), (3072, 768), (768, 30000)] {
        let copies = (PASS_BYTES / (inputs * outputs * 4)).max(1);
        let mut packed = Vec::with_capacity(copies);
        let mut int8 = Vec::with_capacity(copies);
        let mut q8_0 = Vec::with_capacity(copies);
        for _ in 0..copies {
            let w = Tensor::randn(0f32, 1.0, (outputs, inputs), &dev)?;
            int8.push(QuantizedWeight::quantize(&w)?);
            q8_0.push(QMatMul::from_qtensor(QTensor::quantize(
                &w,
                GgmlDType::Q8_0,
            )?)?);
            packed.push(PackedWeight::pack(&w)?);
        }
        let bias = vec![0.1f32; outputs];
        for rows in [1, 5, 80] {
            let x = Tensor::randn(0f32, 1.0, (rows, inputs), &dev)?;
            let f32_time = median(passes, copies, || {
                for w in &packed {
                    std::hint::black_box(w.linear(&x, Some(&bias))?);
                }
                Ok(())
            })?;
            let int8_time = median(passes, copies, || {
                for w in &int8 {
                    std::hint::black_box(w.linear(&x, Some(&bias))?);
                }
                Ok(())
            })?;
            let q8_time = median(passes, copies, || {
                for w in &q8_0 {
                    std::hint::black_box(w.forward(&x)?);
                }
                Ok(())
            })?;
            println!(
                "{:>16} {rows:>5} {:>9.3} {:>9.3} {:>9.3} {:>8.2} {:>8.2}",
                format!("{inputs}→{outputs}"),
                f32_time * 1e3,
                int8_time * 1e3,
                q8_time * 1e3,
                f32_time / int8_time,
                q8_time / int8_time
            );
        }
    }
    Ok(())
}
