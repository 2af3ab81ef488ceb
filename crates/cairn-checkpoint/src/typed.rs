//! Stored state as data: decoding postcard bytes into JSON, and encoding JSON back, driven by a
//! [`TypeShape`] that the checkpoint stores, so tools read and write state without the job's
//! Rust types (`cairn checkpoint export|import|dump-state`).
//!
//! JSON mapping (serde's usual one, made unambiguous where postcard's is not self-describing):
//! integers are numbers (128-bit ones outside the 64-bit range are strings), floats numbers
//! (non-finite ones the strings `"NaN"`, `"inf"`, `"-inf"`), `char` and strings strings, bytes
//! arrays of numbers, unit `null`; tuples, tuple structs and sequences arrays; structs objects;
//! newtypes their content; an option `null` or its value, except that an option of an option (or
//! of unit) writes a present value as a one-element array so `Some(None)` stays distinct; a map
//! with string keys an object, any other map an array of `[key, value]` pairs; an enum's unit
//! variant its name, any other variant `{"Name": content}`.

use crate::schema::TypeShape;
use serde_json::{Map, Number, Value};

/// Decodes one postcard-encoded value of `shape`; every byte must be used.
///
/// ```
/// use cairn_checkpoint::{schema::TypeShape, typed};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Visit { page: String, ms: u32 }
/// let bytes = postcard::to_allocvec(&Visit { page: "/home".into(), ms: 250 }).unwrap();
/// let json = typed::decode(&TypeShape::of::<Visit>(), &bytes).unwrap();
/// assert_eq!(json, serde_json::json!({"page": "/home", "ms": 250}));
/// assert_eq!(typed::encode(&TypeShape::of::<Visit>(), &json).unwrap(), bytes);
/// ```
pub fn decode(shape: &TypeShape, bytes: &[u8]) -> Result<Value, String> {
    let mut r = Reader { bytes, at: 0 };
    let v = decode_at(shape, &mut r, &mut Vec::new())?;
    if r.at != bytes.len() {
        return Err(format!("{} bytes left over after the value", bytes.len() - r.at));
    }
    Ok(v)
}

/// Encodes a JSON value as `shape`'s postcard bytes (what the job itself would have written).
pub fn encode(shape: &TypeShape, value: &Value) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    encode_at(shape, value, &mut out, &mut Vec::new())?;
    Ok(out)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len()).ok_or("the value ends early")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn varint(&mut self) -> Result<u128, String> {
        let mut v: u128 = 0;
        for shift in (0..19 * 7).step_by(7) {
            let b = self.take(1)?[0];
            v |= u128::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("a varint longer than 128 bits".into())
    }
    fn len(&mut self) -> Result<usize, String> {
        usize::try_from(self.varint()?).map_err(|_| "a length past usize".to_string())
    }
}

fn unzigzag(v: u128) -> i128 {
    ((v >> 1) as i128) ^ -((v & 1) as i128)
}

fn zigzag(v: i128) -> u128 {
    ((v << 1) ^ (v >> 127)) as u128
}

fn int_json(v: i128) -> Value {
    match i64::try_from(v) {
        Ok(i) => Value::Number(i.into()),
        Err(_) => match u64::try_from(v) {
            Ok(u) => Value::Number(u.into()),
            Err(_) => Value::String(v.to_string()),
        },
    }
}

fn uint_json(v: u128) -> Value {
    u64::try_from(v).map_or_else(|_| Value::String(v.to_string()), |u| Value::Number(u.into()))
}

fn float_json(v: f64) -> Value {
    Number::from_f64(v).map_or_else(
        || {
            Value::String(
                if v.is_nan() {
                    "NaN"
                } else if v > 0.0 {
                    "inf"
                } else {
                    "-inf"
                }
                .into(),
            )
        },
        Value::Number,
    )
}

/// The container a `Recursive(name)` refers to: the nearest enclosing one of that name.
fn resolve<'s>(name: &str, stack: &[&'s TypeShape]) -> Result<&'s TypeShape, String> {
    stack
        .iter()
        .rev()
        .find(|s| match s {
            TypeShape::Newtype { name: n, .. }
            | TypeShape::TupleStruct { name: n, .. }
            | TypeShape::Struct { name: n, .. }
            | TypeShape::Enum { name: n, .. } => n == name,
            _ => false,
        })
        .copied()
        .ok_or_else(|| format!("the recursive type {name} has no enclosing definition"))
}

fn is_container(s: &TypeShape) -> bool {
    matches!(
        s,
        TypeShape::Newtype { .. }
            | TypeShape::TupleStruct { .. }
            | TypeShape::Struct { .. }
            | TypeShape::Enum { .. }
    )
}

/// Whether a present option value is written as `[value]` (see the module doc).
fn boxed_some(inner: &TypeShape) -> bool {
    matches!(inner, TypeShape::Option(_)) || matches!(inner, TypeShape::Prim(p) if p == "unit")
}

fn string_keyed(key: &TypeShape) -> bool {
    match key {
        TypeShape::Prim(p) => p == "str" || p == "char",
        TypeShape::Newtype { inner, .. } => string_keyed(inner),
        _ => false,
    }
}

/// Runs `f` on the shape a node stands for (a recursion marker resolved to its container),
/// with that container on the stack while `f` runs, so markers below it resolve.
fn at_node<'s, T>(
    shape: &'s TypeShape,
    stack: &mut Vec<&'s TypeShape>,
    f: &mut impl FnMut(&'s TypeShape, &mut Vec<&'s TypeShape>) -> Result<T, String>,
) -> Result<T, String> {
    let shape = match shape {
        TypeShape::Recursive(name) => resolve(name, stack)?,
        s => s,
    };
    let pushed = is_container(shape);
    if pushed {
        stack.push(shape);
    }
    let out = f(shape, stack);
    if pushed {
        stack.pop();
    }
    out
}

fn decode_at<'s>(
    shape: &'s TypeShape,
    r: &mut Reader<'_>,
    stack: &mut Vec<&'s TypeShape>,
) -> Result<Value, String> {
    at_node(shape, stack, &mut |s, stack| decode_inner(s, r, stack))
}

fn decode_inner<'s>(
    shape: &'s TypeShape,
    r: &mut Reader<'_>,
    stack: &mut Vec<&'s TypeShape>,
) -> Result<Value, String> {
    Ok(match shape {
        TypeShape::Prim(p) => match p.as_str() {
            "bool" => match r.take(1)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{b} is not a bool")),
            },
            "u8" => Value::from(r.take(1)?[0]),
            "i8" => Value::from(r.take(1)?[0] as i8),
            "u16" | "u32" | "u64" | "u128" => uint_json(r.varint()?),
            "i16" | "i32" | "i64" | "i128" => int_json(unzigzag(r.varint()?)),
            "f32" => float_json(f64::from(f32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes")))),
            "f64" => float_json(f64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"))),
            "char" | "str" => {
                let n = r.len()?;
                Value::String(std::str::from_utf8(r.take(n)?).map_err(|e| e.to_string())?.to_string())
            }
            "bytes" => {
                let n = r.len()?;
                Value::Array(r.take(n)?.iter().map(|b| Value::from(*b)).collect())
            }
            "unit" => Value::Null,
            other => return Err(format!("unknown primitive {other}")),
        },
        TypeShape::Option(inner) => match r.take(1)?[0] {
            0 => Value::Null,
            1 if boxed_some(inner) => Value::Array(vec![decode_at(inner, r, stack)?]),
            1 => decode_at(inner, r, stack)?,
            b => return Err(format!("{b} is not an option tag")),
        },
        TypeShape::Seq(x) => {
            let n = r.len()?;
            Value::Array((0..n).map(|_| decode_at(x, r, stack)).collect::<Result<_, _>>()?)
        }
        TypeShape::Map(k, v) => {
            let n = r.len()?;
            if string_keyed(k) {
                let mut m = Map::new();
                for _ in 0..n {
                    let Value::String(key) = decode_at(k, r, stack)? else { unreachable!("string keys") };
                    m.insert(key, decode_at(v, r, stack)?);
                }
                Value::Object(m)
            } else {
                let mut pairs = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    pairs.push(Value::Array(vec![decode_at(k, r, stack)?, decode_at(v, r, stack)?]));
                }
                Value::Array(pairs)
            }
        }
        TypeShape::Tuple(xs) | TypeShape::TupleStruct { fields: xs, .. } => {
            Value::Array(xs.iter().map(|x| decode_at(x, r, stack)).collect::<Result<_, _>>()?)
        }
        TypeShape::Newtype { inner, .. } => decode_at(inner, r, stack)?,
        TypeShape::Struct { fields, .. } => {
            let mut m = Map::new();
            for (name, x) in fields {
                m.insert(name.clone(), decode_at(x, r, stack)?);
            }
            Value::Object(m)
        }
        TypeShape::Enum { name, variants } => {
            let i = r.varint()?;
            let (variant, content) = usize::try_from(i)
                .ok()
                .and_then(|i| variants.get(i))
                .ok_or_else(|| format!("{name} has no variant number {i}"))?;
            match content {
                TypeShape::Prim(p) if p == "unit" => Value::String(variant.clone()),
                c => {
                    let mut m = Map::new();
                    m.insert(variant.clone(), decode_at(c, r, stack)?);
                    Value::Object(m)
                }
            }
        }
        TypeShape::Recursive(_) => unreachable!("resolved by at_node"),
        TypeShape::Unknown => {
            return Err("the stored shape is incomplete here (tracing did not reach it)".into())
        }
        TypeShape::Opaque(what) => {
            return Err(format!(
                "the type's shape is not known here ({what}: it needs a self-describing format)"
            ))
        }
    })
}

fn put_varint(mut v: u128, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn json_int(v: &Value) -> Result<i128, String> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .ok_or_else(|| format!("{n} is not an integer")),
        Value::String(s) => s.parse().map_err(|_| format!("{s:?} is not an integer")),
        other => Err(format!("expected an integer, found {other}")),
    }
}

fn json_uint(v: &Value) -> Result<u128, String> {
    match v {
        Value::String(s) => s.parse().map_err(|_| format!("{s:?} is not an unsigned integer")),
        v => u128::try_from(json_int(v)?).map_err(|_| format!("{v} is negative")),
    }
}

fn json_float(v: &Value) -> Result<f64, String> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a number")),
        Value::String(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            _ => Err(format!("{s:?} is not a number")),
        },
        other => Err(format!("expected a number, found {other}")),
    }
}

fn ranged<T: TryFrom<i128>>(v: &Value, what: &str) -> Result<T, String> {
    T::try_from(json_int(v)?).map_err(|_| format!("{v} does not fit in {what}"))
}

fn array(v: &Value, n: Option<usize>) -> Result<&Vec<Value>, String> {
    match v {
        Value::Array(a) if n.is_none_or(|n| a.len() == n) => Ok(a),
        Value::Array(a) => Err(format!("expected {} elements, found {}", n.unwrap_or_default(), a.len())),
        other => Err(format!("expected an array, found {other}")),
    }
}

fn encode_at<'s>(
    shape: &'s TypeShape,
    v: &Value,
    out: &mut Vec<u8>,
    stack: &mut Vec<&'s TypeShape>,
) -> Result<(), String> {
    at_node(shape, stack, &mut |s, stack| encode_inner(s, v, out, stack))
}

fn encode_inner<'s>(
    shape: &'s TypeShape,
    v: &Value,
    out: &mut Vec<u8>,
    stack: &mut Vec<&'s TypeShape>,
) -> Result<(), String> {
    match shape {
        TypeShape::Prim(p) => match p.as_str() {
            "bool" => out.push(u8::from(v.as_bool().ok_or_else(|| format!("expected a bool, found {v}"))?)),
            "u8" => out.push(ranged::<u8>(v, "u8")?),
            "i8" => out.push(ranged::<i8>(v, "i8")? as u8),
            "u16" => put_varint(u128::from(ranged::<u16>(v, "u16")?), out),
            "u32" => put_varint(u128::from(ranged::<u32>(v, "u32")?), out),
            "u64" => put_varint(u128::from(ranged::<u64>(v, "u64")?), out),
            "u128" => put_varint(json_uint(v)?, out),
            "i16" => put_varint(zigzag(i128::from(ranged::<i16>(v, "i16")?)), out),
            "i32" => put_varint(zigzag(i128::from(ranged::<i32>(v, "i32")?)), out),
            "i64" => put_varint(zigzag(i128::from(ranged::<i64>(v, "i64")?)), out),
            "i128" => put_varint(zigzag(json_int(v)?), out),
            "f32" => out.extend_from_slice(&(json_float(v)? as f32).to_le_bytes()),
            "f64" => out.extend_from_slice(&json_float(v)?.to_le_bytes()),
            "char" | "str" => {
                let s = v.as_str().ok_or_else(|| format!("expected a string, found {v}"))?;
                if p == "char" && s.chars().count() != 1 {
                    return Err(format!("{s:?} is not one character"));
                }
                put_varint(s.len() as u128, out);
                out.extend_from_slice(s.as_bytes());
            }
            "bytes" => {
                let a = array(v, None)?;
                put_varint(a.len() as u128, out);
                for b in a {
                    out.push(ranged::<u8>(b, "a byte")?);
                }
            }
            "unit" if v.is_null() => {}
            "unit" => return Err(format!("expected null, found {v}")),
            other => return Err(format!("unknown primitive {other}")),
        },
        TypeShape::Option(inner) => match v {
            Value::Null => out.push(0),
            v if boxed_some(inner) => {
                out.push(1);
                encode_at(inner, &array(v, Some(1))?[0], out, stack)?;
            }
            v => {
                out.push(1);
                encode_at(inner, v, out, stack)?;
            }
        },
        TypeShape::Seq(x) => {
            let a = array(v, None)?;
            put_varint(a.len() as u128, out);
            for e in a {
                encode_at(x, e, out, stack)?;
            }
        }
        TypeShape::Map(k, val) => match v {
            Value::Object(m) if string_keyed(k) => {
                put_varint(m.len() as u128, out);
                for (key, e) in m {
                    encode_at(k, &Value::String(key.clone()), out, stack)?;
                    encode_at(val, e, out, stack)?;
                }
            }
            v => {
                let pairs = array(v, None)?;
                put_varint(pairs.len() as u128, out);
                for p in pairs {
                    let p = array(p, Some(2))?;
                    encode_at(k, &p[0], out, stack)?;
                    encode_at(val, &p[1], out, stack)?;
                }
            }
        },
        TypeShape::Tuple(xs) | TypeShape::TupleStruct { fields: xs, .. } => {
            for (x, e) in xs.iter().zip(array(v, Some(xs.len()))?) {
                encode_at(x, e, out, stack)?;
            }
        }
        TypeShape::Newtype { inner, .. } => encode_at(inner, v, out, stack)?,
        TypeShape::Struct { name, fields } => {
            let m = v.as_object().ok_or_else(|| format!("expected an object for {name}, found {v}"))?;
            if let Some(extra) = m.keys().find(|k| !fields.iter().any(|(f, _)| f == *k)) {
                return Err(format!("{name} has no field {extra:?}"));
            }
            for (f, x) in fields {
                let e = m.get(f).ok_or_else(|| format!("{name}: field {f:?} is missing"))?;
                encode_at(x, e, out, stack)?;
            }
        }
        TypeShape::Enum { name, variants } => {
            let (variant, content) = match v {
                Value::String(s) => (s.as_str(), None),
                Value::Object(m) if m.len() == 1 => {
                    let (k, c) = m.iter().next().expect("one entry");
                    (k.as_str(), Some(c))
                }
                other => return Err(format!("expected a variant of {name}, found {other}")),
            };
            let i = variants
                .iter()
                .position(|(n, _)| n == variant)
                .ok_or_else(|| format!("{name} has no variant {variant:?}"))?;
            put_varint(i as u128, out);
            match (&variants[i].1, content) {
                (TypeShape::Prim(p), None) if p == "unit" => {}
                (shape, Some(c)) => encode_at(shape, c, out, stack)?,
                (_, None) => return Err(format!("{name}::{variant} needs content: {{\"{variant}\": ...}}")),
            }
        }
        TypeShape::Recursive(_) => unreachable!("resolved by at_node"),
        TypeShape::Unknown => {
            return Err("the stored shape is incomplete here (tracing did not reach it)".into())
        }
        TypeShape::Opaque(what) => {
            return Err(format!(
                "the type's shape is not known here ({what}: it needs a self-describing format)"
            ))
        }
    }
    Ok(())
}
