//! Model files written and read back, and foreign or damaged ones refused.

use super::*;
use crate::model::glorot_init;

/// A write whose folder is gone says so, naming the file, and leaves nothing behind.
#[test]
fn a_write_into_a_vanished_folder_says_the_write_failed() {
    let base = std::env::temp_dir().join(format!("gpu-mnist-vanished-{}", std::process::id()));
    let path = base.join("gone").join("m.safetensors");
    let err = write_atomic(&path, b"x")
        .expect_err("the folder does not exist")
        .to_string();
    assert!(
        err.contains("m.safetensors") && err.contains("could not be written"),
        "{err}"
    );
    assert!(err.contains("does not exist"), "{err}");
    assert!(!base.exists());
}

/// The same model gives the same file byte for byte (the metadata's order included), and the
/// crate reads the re-ordered header back.
#[test]
fn the_same_model_gives_the_same_bytes() -> std::result::Result<(), String> {
    let spec = ModelSpec::convnet();
    let ck = Checkpoint::model(&spec, glorot_init(&spec, 1), DatasetKind::Mnist);
    let first = to_bytes(&ck).map_err(|e| e.to_string())?;
    for _ in 0..8 {
        assert!(to_bytes(&ck).map_err(|e| e.to_string())? == first, "two writes differ");
    }
    let len = u64::from_le_bytes(first[..8].try_into().map_err(|_| "short")?) as usize;
    assert_eq!(len % 8, 0);
    let header = std::str::from_utf8(&first[8..8 + len]).map_err(|e| e.to_string())?;
    let keys = ["activation", "dataset", "format", "layers", "tensor_data_sha256"];
    let at: Vec<usize> = keys.iter().filter_map(|k| header.find(&format!("\"{k}\""))).collect();
    assert!(
        at.len() == keys.len() && at.is_sorted(),
        "metadata keys out of order: {header}"
    );
    assert_eq!(from_bytes(&first)?, ck);
    Ok(())
}

#[test]
fn round_trip_and_rejections() -> std::result::Result<(), String> {
    let spec = ModelSpec::mnist(&[5]);
    let params = glorot_init(&spec, 3);
    let ck = Checkpoint::model(&spec, params.clone(), DatasetKind::Fashion);
    let bytes = to_bytes(&ck).map_err(|e| e.to_string())?;
    assert_eq!(from_bytes(&bytes)?, ck);
    assert_eq!(from_bytes(&bytes)?.dataset, Some(DatasetKind::Fashion));
    let full = Checkpoint {
        optimizer: OptimizerState {
            velocities: glorot_init(&spec, 4),
            momenta: glorot_init(&spec, 5),
        },
        best: glorot_init(&spec, 6),
        state: Some(serde_json::json!({"epochs_done": 2})),
        ..ck
    };
    assert_eq!(from_bytes(&to_bytes(&full).map_err(|e| e.to_string())?)?, full);
    let cut = from_bytes(&bytes[..bytes.len() - 4]).unwrap_err();
    assert!(cut.contains("not a valid safetensors file"), "{cut}");
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(from_bytes(&huge).unwrap_err().contains("header length"));
    // A dataset this build does not know is refused, naming the ones it does.
    let mut meta = HashMap::from([("layers".to_string(), "784,5,10".to_string())]);
    meta.insert(DATASET_KEY.to_string(), "cifar10".to_string());
    let data: Vec<(String, Vec<u8>)> = params
        .iter()
        .map(|t| (t.name.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = data
        .iter()
        .zip(&params)
        .map(|((name, bytes), t)| Ok((name.as_str(), TensorView::new(Dtype::F32, t.shape.clone(), bytes)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| e.to_string())?;
    let foreign = safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())?;
    let err = from_bytes(&foreign).unwrap_err();
    assert!(
        err.contains("\"cifar10\" is not one of mnist, fashion, kmnist"),
        "{err}"
    );
    Ok(())
}

/// Any flipped byte of the tensor data is caught by the stored SHA-256.
#[test]
fn a_damaged_tensor_byte_is_refused() -> std::result::Result<(), String> {
    let spec = ModelSpec::mnist(&[3]);
    let bytes =
        to_bytes(&Checkpoint::model(&spec, glorot_init(&spec, 5), DatasetKind::Mnist)).map_err(|e| e.to_string())?;
    let head = 8 + u64::from_le_bytes(bytes[..8].try_into().map_err(|_| "no header length")?) as usize;
    for at in [head, head + 1, (head + bytes.len()) / 2, bytes.len() - 1] {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x01;
        let err = from_bytes(&damaged).unwrap_err();
        assert!(err.contains("is damaged"), "byte {at}: {err}");
    }
    Ok(())
}

/// A file as Python's `safetensors` would write it (its own tensor order, extra metadata,
/// no hash of ours) loads, and says it carries no hash.
#[test]
fn a_foreign_file_loads_without_a_hash() -> std::result::Result<(), String> {
    let spec = ModelSpec::mnist(&[4]);
    let params = glorot_init(&spec, 6);
    // Reverse name order (not the crate's), offsets accordingly, and foreign metadata.
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".to_string(),
        serde_json::json!({"format": "pt", "layers": "784,4,10", "written_by": "numpy"}),
    );
    let mut data = Vec::new();
    for t in params.iter().rev() {
        let begin = data.len();
        data.extend(t.data.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [begin, data.len()]}),
        );
    }
    let mut head = Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut file = (head.len() as u64).to_le_bytes().to_vec();
    file.extend(head);
    file.extend(data);
    let ck = from_bytes(&file)?;
    assert_eq!(ck.data_hash, DataHash::Absent);
    assert_eq!(ck.dataset, None);
    assert_eq!(ck.params, params);
    Ok(())
}
