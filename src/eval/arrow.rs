//! Rows of Hugging Face `datasets` Arrow files (`save_to_disk` writes the Arrow IPC *stream* format, one
//! `data-XXXXX-of-YYYYY.arrow` per shard) as JSON objects, so task code reads fields by name.
//!
//! HF features map to Arrow as: `Value(string)` → Utf8, `Value(int32)` / `ClassLabel` → Int32 / Int64,
//! `Sequence(string)` → `List<Utf8>`, and `Sequence({text, label})` → `Struct{text: List<Utf8>, label: List<Utf8>}`
//! (a sequence of dicts is stored as a dict of lists).

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type, Int8Type, UInt32Type};
use arrow_array::{Array, RecordBatch};
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::DataType;
use serde_json::{Map, Value};

use crate::{MorError, Result};

/// One dataset row: column name → value.
pub type Row = Map<String, Value>;

/// Read every row of an Arrow IPC stream file.
pub fn read_arrow_rows(path: &Path) -> Result<Vec<Row>> {
    let batches = read_batches(path)?;
    let mut rows = Vec::new();
    for batch in &batches {
        let schema = batch.schema();
        for i in 0..batch.num_rows() {
            let mut row = Map::new();
            for (field, col) in schema.fields().iter().zip(batch.columns()) {
                row.insert(field.name().clone(), value(col.as_ref(), i, path)?);
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The record batches of an Arrow IPC stream file.
pub fn read_batches(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = File::open(path).map_err(|e| MorError::io(path, e))?;
    let reader = StreamReader::try_new(BufReader::new(file), None)
        .map_err(|e| MorError::Data(format!("{}: not an Arrow IPC stream: {e}", path.display())))?;
    reader
        .map(|b| b.map_err(|e| MorError::Data(format!("{}: {e}", path.display()))))
        .collect()
}

/// Write the first `n` rows of `batches` to `path` as an Arrow IPC stream with the same schema (used to cut small
/// test samples out of the real files).
pub fn write_head(batches: &[RecordBatch], n: usize, path: &Path) -> Result<()> {
    let Some(first) = batches.first() else {
        return Err(MorError::Data("no record batches to write".into()));
    };
    let file = File::create(path).map_err(|e| MorError::io(path, e))?;
    let err = |e: arrow_schema::ArrowError| MorError::Data(format!("{}: {e}", path.display()));
    let mut w = StreamWriter::try_new(file, &first.schema()).map_err(err)?;
    let mut left = n;
    for b in batches {
        if left == 0 {
            break;
        }
        let take = left.min(b.num_rows());
        w.write(&b.slice(0, take)).map_err(err)?;
        left -= take;
    }
    w.finish().map_err(err)
}

/// Write `batch` to `path` as an Arrow IPC stream.
pub fn write_batch(batch: &RecordBatch, path: &Path) -> Result<()> {
    write_head(std::slice::from_ref(batch), batch.num_rows(), path)
}

/// Build a record batch from named columns (a convenience for tests and tools).
pub fn batch_from_columns(columns: Vec<(&str, Arc<dyn Array>)>) -> Result<RecordBatch> {
    RecordBatch::try_from_iter(columns.into_iter().map(|(n, a)| (n.to_string(), a)))
        .map_err(|e| MorError::Data(format!("record batch: {e}")))
}

fn value(arr: &dyn Array, i: usize, path: &Path) -> Result<Value> {
    if arr.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match arr.data_type() {
        DataType::Utf8 => Value::from(arr.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(arr.as_string::<i64>().value(i)),
        DataType::Boolean => Value::from(arr.as_boolean().value(i)),
        DataType::Int8 => Value::from(arr.as_primitive::<Int8Type>().value(i)),
        DataType::Int32 => Value::from(arr.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => Value::from(arr.as_primitive::<Int64Type>().value(i)),
        DataType::UInt32 => Value::from(arr.as_primitive::<UInt32Type>().value(i)),
        DataType::Float32 => Value::from(arr.as_primitive::<Float32Type>().value(i)),
        DataType::Float64 => Value::from(arr.as_primitive::<Float64Type>().value(i)),
        DataType::List(_) => list(arr.as_list::<i32>().value(i).as_ref(), path)?,
        DataType::LargeList(_) => list(arr.as_list::<i64>().value(i).as_ref(), path)?,
        DataType::Struct(fields) => {
            let s = arr.as_struct();
            let mut m = Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                m.insert(f.name().clone(), value(col.as_ref(), i, path)?);
            }
            Value::Object(m)
        }
        other => {
            return Err(MorError::Data(format!(
                "{}: unsupported Arrow column type {other}",
                path.display()
            )))
        }
    })
}

fn list(arr: &dyn Array, path: &Path) -> Result<Value> {
    (0..arr.len())
        .map(|j| value(arr, j, path))
        .collect::<Result<Vec<_>>>()
        .map(Value::Array)
}
