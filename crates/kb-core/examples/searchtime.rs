use kb_core::candle_core::{DType, Device, Tensor};
use kb_core::model::Pass;
use kb_core::{generate, KeywordModel};
use std::time::Instant;
fn main() {
    kb_core::threads::fix_thread_count();
    let dir = std::env::args().nth(1).unwrap();
    let rows: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(16);
    let beams: usize = 5;
    let model =
        KeywordModel::load_dir(std::path::Path::new(&dir), DType::F32, &Device::Cpu).unwrap();
    let m = &model.model;
    let dev = Device::Cpu;
    let queries: Vec<String> = std::fs::read_to_string("/tmp/q48.txt")
        .unwrap()
        .lines()
        .take(rows)
        .map(String::from)
        .collect();
    let qs: Vec<&str> = queries.iter().map(|s| s.as_str()).collect();
    let inputs = model.encode_queries(&qs, None).unwrap();
    let mut cfg = model.generation.clone();
    cfg.num_beams = beams;
    cfg.max_length = 32;
    cfg.max_new_tokens = None;
    let (mut best_gen, mut best_dec) = (f64::MAX, f64::MAX);
    for _ in 0..4 {
        let t = Instant::now();
        let out = generate(m, &inputs, &cfg).unwrap();
        let steps = out.iter().map(|g| g.ids.len()).max().unwrap();
        best_gen = best_gen.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let maxlen = inputs.iter().map(|r| r.len()).max().unwrap();
        let ids = Tensor::from_vec(
            (0..rows * maxlen)
                .map(|i| (i % 1000 + 10) as u32)
                .collect::<Vec<_>>(),
            (rows, maxlen),
            &dev,
        )
        .unwrap();
        let enc = m.encode(&ids, None, Pass::Inference).unwrap();
        let mut cache = m.start_decoding_grouped(&enc, None, beams).unwrap();
        for s in 0..31 {
            let tok = Tensor::from_vec(
                vec![(s % 500 + 7) as u32; rows * beams],
                (rows * beams, 1),
                &dev,
            )
            .unwrap();
            std::hint::black_box(m.decode_step(&tok, &mut cache).unwrap());
        }
        best_dec = best_dec.min(t.elapsed().as_secs_f64());
        let _ = steps;
    }
    println!("{rows} queries: generate {:.0} ms, encoder+31 decode steps {:.0} ms, overhead {:.0} ms ({:.1} ms/step)", best_gen*1e3, best_dec*1e3, (best_gen-best_dec)*1e3, (best_gen-best_dec)*1e3/31.0);
}
