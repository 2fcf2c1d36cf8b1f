//! A minimal writer of PyTorch's `torch.save` zip format (what the hub's `pytorch_model.bin`
//! files are), for tests that need a `.bin` checkpoint without Python: an `OrderedDict` of
//! float32 tensors, each `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, {})`.

use std::io::Write;
use std::path::Path;

use kb_core::candle_core::{DType, Tensor};

fn unicode(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn int(out: &mut Vec<u8>, v: usize) {
    out.push(b'J');
    out.extend_from_slice(&(v as i32).to_le_bytes());
}

fn global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(b'c');
    out.extend_from_slice(module.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
}

fn int_tuple(out: &mut Vec<u8>, values: &[usize]) {
    out.push(b'(');
    for &v in values {
        int(out, v);
    }
    out.push(b't');
}

/// Writes `tensors` (converted to f32) to `path` in torch.save's zip layout.
pub fn write_torch_bin(path: &Path, tensors: &[(String, Tensor)]) {
    let mut pkl = vec![0x80, 2]; // PROTO 2
    global(&mut pkl, "collections", "OrderedDict");
    pkl.push(b')'); // EMPTY_TUPLE
    pkl.push(b'R'); // REDUCE
    pkl.push(b'('); // MARK
    for (key, (name, t)) in tensors.iter().enumerate() {
        unicode(&mut pkl, name);
        global(&mut pkl, "torch._utils", "_rebuild_tensor_v2");
        pkl.push(b'(');
        // persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel)
        pkl.push(b'(');
        unicode(&mut pkl, "storage");
        global(&mut pkl, "torch", "FloatStorage");
        unicode(&mut pkl, &key.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, t.elem_count());
        pkl.push(b't');
        pkl.push(b'Q'); // BINPERSID
        int(&mut pkl, 0);
        int_tuple(&mut pkl, t.dims());
        let mut stride = vec![1usize; t.rank()];
        for i in (0..t.rank().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * t.dims()[i + 1];
        }
        int_tuple(&mut pkl, &stride);
        pkl.push(0x89); // NEWFALSE
        global(&mut pkl, "collections", "OrderedDict");
        pkl.push(b')');
        pkl.push(b'R');
        pkl.push(b't');
        pkl.push(b'R');
    }
    pkl.push(b'u'); // SETITEMS
    pkl.push(b'.'); // STOP

    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&pkl).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    for (key, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), opts).unwrap();
        let values = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        zip.write_all(&bytes).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}
