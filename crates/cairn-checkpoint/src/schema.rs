//! Stable identities of state types.
//!
//! A checkpoint records, per stateful operator, what its keys and values are, so that a restart
//! with code whose types changed is refused instead of misreading the stored bytes. That record
//! must not depend on where a type lives (`std::any::type_name` changes when a type moves to
//! another module, and may change with the compiler), only on what its encoding depends on.
//!
//! A [`StateSchema`] is that identity: a display name, the user's version of the state's meaning
//! (`OpName::with_version` in `cairn`) and a *structural fingerprint*, a hash of the type's serde
//! shape found by driving its `Deserialize` impl with a tracing deserializer: primitive kinds,
//! sequences, maps, options, tuples, struct field names and types in order, enum variant names
//! and contents. Container names (struct and enum names) and newtype wrappers are not part of
//! it, because the encoding does not depend on them: renaming or moving a type, or wrapping a
//! value in a newtype, keeps the identity; adding, removing, reordering, renaming or retyping a
//! field or a variant changes it.
//!
//! Limits: a recursive type is traced down to its second nesting in itself (deeper levels have
//! the same shape); a `Deserialize` impl that rejects every value the tracer offers (e.g. one
//! that parses a string) is fingerprinted up to that point. Both are deterministic, so the
//! identity stays stable; only a change past that point would go unnoticed.

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The identity of a checkpointed type: what restarts compare, and what a migration will start
/// from.
///
/// ```
/// use cairn_checkpoint::schema::StateSchema;
/// #[derive(serde::Deserialize)]
/// struct Session { clicks: u64, last_page: String }
/// let s = StateSchema::of::<Session>();
/// assert_eq!((s.name.as_str(), s.version), ("Session", 1));
///
/// mod elsewhere {
///     #[derive(serde::Deserialize)]
///     pub struct Session { pub clicks: u64, pub last_page: String }
/// }
/// #[derive(serde::Deserialize)]
/// struct Session2 { clicks: u64, last_page: String, referrer: Option<String> }
/// // Another module, same shape: same fingerprint. A field added: another one.
/// assert_eq!(StateSchema::of::<elsewhere::Session>().fingerprint, s.fingerprint);
/// assert_ne!(StateSchema::of::<Session2>().fingerprint, s.fingerprint);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StateSchema {
    /// A readable name derived from the shape (`Session`, `u64`, `(u64, i64)`, `Vec<String>`);
    /// informational, not compared.
    pub name: String,
    /// The user's version of the state's meaning, for changes the shape does not show.
    pub version: u32,
    /// Hash (64-bit FNV-1a) of the type's canonical serde shape.
    pub fingerprint: u64,
}

impl StateSchema {
    /// The schema of `T`, version 1.
    pub fn of<T: DeserializeOwned>() -> Self {
        let shape = trace::<T>();
        let mut canonical = String::new();
        canonical_form(&shape, &mut Vec::new(), &mut canonical);
        Self {
            name: display_name(&shape).replace('#', "_"),
            version: 1,
            fingerprint: fnv1a(canonical.as_bytes()),
        }
    }

    /// The same schema with another version.
    ///
    /// ```
    /// use cairn_checkpoint::schema::StateSchema;
    /// assert_eq!(StateSchema::of::<u64>().with_version(3).version, 3);
    /// ```
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// The text stored in `OperatorDescription::key_type` / `state_type`: `name#fingerprint`
    /// followed by the Rust type path. The path is informational (it is how checkpoints written
    /// before schemas named the type, so those can still be matched); the version is stored in
    /// `state_version`.
    ///
    /// ```
    /// use cairn_checkpoint::schema::{StateSchema, TypeIdentity};
    /// let text = StateSchema::of::<u64>().type_text("u64");
    /// match TypeIdentity::parse(&text) {
    ///     TypeIdentity::Schema { name, fingerprint, rust_type } => {
    ///         assert_eq!((name, rust_type), ("u64", "u64"));
    ///         assert_eq!(fingerprint, StateSchema::of::<u64>().fingerprint);
    ///     }
    ///     TypeIdentity::Legacy(_) => unreachable!(),
    /// }
    /// ```
    pub fn type_text(&self, rust_type: &str) -> String {
        format!("{}#{:016x} {rust_type}", self.name, self.fingerprint)
    }
}

impl std::fmt::Display for StateSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} v{} (shape {:016x})", self.name, self.version, self.fingerprint)
    }
}

/// A type's structure as graph descriptions store it (`key_shape`, `state_shape`): what
/// [`crate::typed`] needs to decode and encode the type's stored values without the Rust type,
/// so that `cairn checkpoint export` and `import` read and write state as data. Unlike the
/// fingerprint, it keeps container names (for people, and to resolve recursion).
///
/// ```
/// use cairn_checkpoint::schema::TypeShape;
/// #[derive(serde::Deserialize)]
/// #[allow(dead_code)]
/// struct Session { clicks: u64, last_page: Option<String> }
/// let shape = TypeShape::of::<Session>();
/// assert_eq!(serde_json::to_string(&shape).unwrap(),
///     r#"{"struct":{"name":"Session","fields":[["clicks",{"prim":"u64"}],["last_page",{"option":{"prim":"str"}}]]}}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeShape {
    /// Not reached by tracing (a variant or element the tracer could not enter).
    Unknown,
    /// `bool`, `i8`..`i128`, `u8`..`u128`, `f32`, `f64`, `char`, `str`, `bytes`, `unit`.
    Prim(String),
    /// `Option<T>`.
    Option(Box<TypeShape>),
    /// A sequence (`Vec<T>`, sets, ...).
    Seq(Box<TypeShape>),
    /// A map: key and value.
    Map(Box<TypeShape>, Box<TypeShape>),
    /// A tuple.
    Tuple(Vec<TypeShape>),
    /// A newtype struct (encoded as its content).
    Newtype {
        /// The struct's name.
        name: String,
        /// Its content.
        inner: Box<TypeShape>,
    },
    /// A tuple struct.
    TupleStruct {
        /// The struct's name.
        name: String,
        /// Its fields in order.
        fields: Vec<TypeShape>,
    },
    /// A struct (or a struct variant, named like its enum).
    Struct {
        /// The struct's name.
        name: String,
        /// Field names and shapes, in order.
        fields: Vec<(String, TypeShape)>,
    },
    /// An enum: variants in declaration order (a variant's index is its position). A unit
    /// variant is `unit`, a newtype variant its content, a tuple variant a tuple, a struct
    /// variant a struct.
    Enum {
        /// The enum's name.
        name: String,
        /// Variant names and contents.
        variants: Vec<(String, TypeShape)>,
    },
    /// The nearest enclosing container of this name again (a recursive type).
    Recursive(String),
    /// Something the tracer cannot follow (a type that needs a self-describing format).
    Opaque(String),
}

impl TypeShape {
    /// The shape of `T`, traced from its `Deserialize` impl.
    pub fn of<T: DeserializeOwned>() -> Self {
        Self::convert(&trace::<T>(), &mut Vec::new())
    }

    /// Converts a traced shape. Tracing stops a recursive type at its second nesting, where
    /// parts are left unknown; the outermost copy is complete (every pass is merged into it),
    /// so an inner copy that agrees with an enclosing container of the same name becomes a
    /// reference to it. A generic wrapper nested in itself (`W<W<u64>>`) disagrees with its
    /// outer copy and stays as it is.
    fn convert<'s>(s: &'s Shape, enclosing: &mut Vec<&'s Shape>) -> Self {
        if let Some(name) = container_name(s) {
            if enclosing.iter().rev().any(|outer| container_name(outer) == Some(name) && agrees(outer, s)) {
                return TypeShape::Recursive(name.to_string());
            }
            enclosing.push(s);
            let t = Self::convert_node(s, enclosing);
            enclosing.pop();
            return t;
        }
        Self::convert_node(s, enclosing)
    }

    fn convert_node<'s>(s: &'s Shape, enclosing: &mut Vec<&'s Shape>) -> Self {
        let mut one = |x: &'s Shape| Box::new(Self::convert(x, enclosing));
        match s {
            Shape::Unknown => TypeShape::Unknown,
            Shape::Prim(p) => TypeShape::Prim(p.to_string()),
            Shape::Option(x) => TypeShape::Option(one(x)),
            Shape::Seq(x) => TypeShape::Seq(one(x)),
            Shape::Map(k, v) => {
                let k = one(k);
                TypeShape::Map(k, Box::new(Self::convert(v, enclosing)))
            }
            Shape::Newtype(n, x) => TypeShape::Newtype { name: n.to_string(), inner: one(x) },
            Shape::Tuple(xs) => TypeShape::Tuple(xs.iter().map(|x| Self::convert(x, enclosing)).collect()),
            Shape::TupleStruct(n, xs) => TypeShape::TupleStruct {
                name: n.to_string(),
                fields: xs.iter().map(|x| Self::convert(x, enclosing)).collect(),
            },
            Shape::Struct(n, fs) => TypeShape::Struct {
                name: n.to_string(),
                fields: fs.iter().map(|(f, x)| (f.to_string(), Self::convert(x, enclosing))).collect(),
            },
            Shape::Enum(n, vs) => TypeShape::Enum {
                name: n.to_string(),
                variants: vs.iter().map(|(v, x)| (v.to_string(), Self::convert(x, enclosing))).collect(),
            },
            Shape::Recursive(n) => TypeShape::Recursive(n.to_string()),
            Shape::Opaque(n) => TypeShape::Opaque(n.to_string()),
        }
    }
}

fn container_name(s: &Shape) -> Option<&'static str> {
    match s {
        Shape::Newtype(n, _) | Shape::TupleStruct(n, _) | Shape::Struct(n, _) | Shape::Enum(n, _) => Some(n),
        _ => None,
    }
}

/// Whether two traced copies can be the same type: the same structure wherever both were
/// traced (an unknown part or a recursion marker agrees with anything).
fn agrees(a: &Shape, b: &Shape) -> bool {
    match (a, b) {
        (Shape::Unknown | Shape::Recursive(_), _) | (_, Shape::Unknown | Shape::Recursive(_)) => true,
        (Shape::Prim(x), Shape::Prim(y)) | (Shape::Opaque(x), Shape::Opaque(y)) => x == y,
        (Shape::Option(x), Shape::Option(y)) | (Shape::Seq(x), Shape::Seq(y)) => agrees(x, y),
        (Shape::Newtype(n, x), Shape::Newtype(m, y)) => n == m && agrees(x, y),
        (Shape::Map(k, v), Shape::Map(j, w)) => agrees(k, j) && agrees(v, w),
        (Shape::Tuple(xs), Shape::Tuple(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| agrees(x, y))
        }
        (Shape::TupleStruct(n, xs), Shape::TupleStruct(m, ys)) => {
            n == m && xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| agrees(x, y))
        }
        (Shape::Struct(n, xs), Shape::Struct(m, ys)) | (Shape::Enum(n, xs), Shape::Enum(m, ys)) => {
            n == m && xs.len() == ys.len() && xs.iter().zip(ys).all(|((f, x), (g, y))| f == g && agrees(x, y))
        }
        _ => false,
    }
}

/// A key or state type as a graph description records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeIdentity<'a> {
    /// Written by [`StateSchema::type_text`].
    Schema {
        /// The schema's display name.
        name: &'a str,
        /// The structural fingerprint.
        fingerprint: u64,
        /// The Rust type path when it was written (informational).
        rust_type: &'a str,
    },
    /// Anything else: a Rust type path written before schemas existed, or a fixed tag such as a
    /// source's `offsets`.
    Legacy(&'a str),
}

impl<'a> TypeIdentity<'a> {
    /// Reads a `key_type` / `state_type` text. A Rust type path never contains `#`, so a
    /// legacy path is never mistaken for a schema.
    ///
    /// ```
    /// use cairn_checkpoint::schema::TypeIdentity;
    /// assert_eq!(TypeIdentity::parse("alloc::string::String"), TypeIdentity::Legacy("alloc::string::String"));
    /// ```
    pub fn parse(text: &'a str) -> Self {
        let parsed = text.split_once('#').and_then(|(name, rest)| {
            let hex = rest.get(..16)?;
            let fingerprint = u64::from_str_radix(hex, 16).ok()?;
            let rust_type = match &rest[16..] {
                "" => "",
                r => r.strip_prefix(' ')?,
            };
            Some(TypeIdentity::Schema { name, fingerprint, rust_type })
        });
        parsed.unwrap_or(TypeIdentity::Legacy(text))
    }

    /// Whether a stored identity (`self`) describes the same type as the code's (`new`): equal
    /// fingerprints; a legacy type path matches a schema written for the same path (a
    /// checkpoint from before schemas, restored by code whose type is where it was); two legacy
    /// texts match when equal.
    ///
    /// ```
    /// use cairn_checkpoint::schema::{StateSchema, TypeIdentity};
    /// let new = StateSchema::of::<(u64, i64)>().type_text("(u64, i64)");
    /// assert!(TypeIdentity::parse("(u64, i64)").matches(&TypeIdentity::parse(&new)));
    /// assert!(!TypeIdentity::parse("(u64, u64)").matches(&TypeIdentity::parse(&new)));
    /// ```
    pub fn matches(&self, new: &TypeIdentity<'_>) -> bool {
        match (self, new) {
            (TypeIdentity::Schema { fingerprint: a, .. }, TypeIdentity::Schema { fingerprint: b, .. }) => {
                a == b
            }
            (TypeIdentity::Legacy(path), TypeIdentity::Schema { rust_type, .. }) => path == rust_type,
            (TypeIdentity::Legacy(a), TypeIdentity::Legacy(b)) => a == b,
            (TypeIdentity::Schema { .. }, TypeIdentity::Legacy(_)) => false,
        }
    }
}

impl std::fmt::Display for TypeIdentity<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TypeIdentity::Schema { name, fingerprint, .. } => write!(f, "{name} (shape {fingerprint:016x})"),
            TypeIdentity::Legacy("") => f.write_str("none"),
            TypeIdentity::Legacy(t) => f.write_str(t),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------------------------
// Tracing.

/// A type's serde shape, as far as tracing found it.
#[derive(Debug, Clone, PartialEq)]
enum Shape {
    Unknown,
    Prim(&'static str),
    Option(Box<Shape>),
    Seq(Box<Shape>),
    Map(Box<Shape>, Box<Shape>),
    Tuple(Vec<Shape>),
    Newtype(&'static str, Box<Shape>),
    TupleStruct(&'static str, Vec<Shape>),
    Struct(&'static str, Vec<(&'static str, Shape)>),
    Enum(&'static str, Vec<(&'static str, Shape)>),
    /// A container met again inside itself: tracing stopped there.
    Recursive(&'static str),
    /// Something the tracer cannot follow (a self-describing `deserialize_any`).
    Opaque(&'static str),
}

/// Position of a node: child indices from the root (field, element, variant index).
type Path = Vec<u32>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Choice {
    Variant(u32),
    /// An option traced as `None`, a sequence or map traced empty.
    Escape,
}

#[derive(Debug, Clone, Copy)]
enum Site {
    Escapable,
    Enum { n: u32, chosen: u32 },
}

#[derive(Debug)]
enum TraceError {
    /// The pass met a container inside itself too deep.
    Cut,
    Other(String),
}

impl std::fmt::Display for TraceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TraceError::Cut => f.write_str("recursive type"),
            TraceError::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for TraceError {}

impl de::Error for TraceError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        TraceError::Other(msg.to_string())
    }
}

/// State of one tracing pass: the choices it follows, and what it met.
struct Pass {
    plan: BTreeMap<Path, Choice>,
    sites: Vec<(Path, Site)>,
    stack: Vec<&'static str>,
    cut: Option<Path>,
}

/// Passes are cheap (no I/O), but a type with many nested enums needs one per variant.
const MAX_PASSES: usize = 512;
/// How often a container may appear inside itself before tracing stops: 2 tells a generic
/// wrapper nested in itself (`W<W<u64>>`) from a real recursion.
const MAX_NESTING: usize = 2;

/// Traces `T` in as many passes as needed to see every enum variant, escaping recursion through
/// options, sequences, maps and other variants; merges what every pass saw.
fn trace<T: DeserializeOwned>() -> Shape {
    let mut shape = Shape::Unknown;
    let mut queue: VecDeque<BTreeMap<Path, Choice>> = VecDeque::from([BTreeMap::new()]);
    let mut planned: BTreeSet<Vec<(Path, Choice)>> = BTreeSet::new();
    let mut explored: BTreeSet<(Path, u32)> = BTreeSet::new();
    let mut passes = 0;
    while let Some(plan) = queue.pop_front() {
        if passes == MAX_PASSES {
            break;
        }
        passes += 1;
        let mut pass = Pass { plan: plan.clone(), sites: Vec::new(), stack: Vec::new(), cut: None };
        let mut seen = Shape::Unknown;
        let _ = T::deserialize(Tracer { slot: &mut seen, path: Vec::new(), pass: &mut pass });
        merge(&mut shape, seen);
        let mut push = |p: BTreeMap<Path, Choice>, queue: &mut VecDeque<_>| {
            if planned.insert(p.iter().map(|(k, v)| (k.clone(), *v)).collect()) {
                queue.push_back(p);
            }
        };
        if let Some(cut) = &pass.cut {
            // Escape at the deepest site above the cut that still has a way out.
            let escape = pass.sites.iter().rev().find_map(|(path, site)| {
                if !(path.len() < cut.len() && cut.starts_with(path)) {
                    return None;
                }
                match *site {
                    Site::Escapable => Some((path.clone(), Choice::Escape)),
                    Site::Enum { n, chosen } if chosen + 1 < n => {
                        Some((path.clone(), Choice::Variant(chosen + 1)))
                    }
                    Site::Enum { .. } => None,
                }
            });
            if let Some((path, choice)) = escape {
                if let Choice::Variant(v) = choice {
                    explored.insert((path.clone(), v));
                }
                let mut p = plan.clone();
                p.insert(path, choice);
                push(p, &mut queue);
            }
        }
        for (path, site) in &pass.sites {
            let Site::Enum { n, chosen } = *site else { continue };
            explored.insert((path.clone(), chosen));
            for v in 0..n {
                if explored.insert((path.clone(), v)) {
                    let mut p = plan.clone();
                    p.insert(path.clone(), Choice::Variant(v));
                    push(p, &mut queue);
                }
            }
        }
    }
    shape
}

/// Fills what `into` does not know yet from `from`.
fn merge(into: &mut Shape, from: Shape) {
    match (into, from) {
        (into @ Shape::Unknown, from) => *into = from,
        (Shape::Option(a), Shape::Option(b)) | (Shape::Seq(a), Shape::Seq(b)) => merge(a, *b),
        (Shape::Newtype(_, a), Shape::Newtype(_, b)) => merge(a, *b),
        (Shape::Map(ka, va), Shape::Map(kb, vb)) => {
            merge(ka, *kb);
            merge(va, *vb);
        }
        (Shape::Tuple(a), Shape::Tuple(b)) | (Shape::TupleStruct(_, a), Shape::TupleStruct(_, b))
            if a.len() == b.len() =>
        {
            for (x, y) in a.iter_mut().zip(b) {
                merge(x, y);
            }
        }
        (Shape::Struct(_, a), Shape::Struct(_, b)) | (Shape::Enum(_, a), Shape::Enum(_, b))
            if a.len() == b.len() =>
        {
            for ((_, x), (_, y)) in a.iter_mut().zip(b) {
                merge(x, y);
            }
        }
        // The same path always traces to the same kind of node; keep the first.
        _ => {}
    }
}

/// The canonical text the fingerprint hashes: no container names, newtypes transparent, a
/// recursion written as its distance to the container it repeats.
fn canonical_form(s: &Shape, containers: &mut Vec<&'static str>, out: &mut String) {
    let mut list =
        |open: &str, items: &mut dyn Iterator<Item = (Option<&str>, &Shape)>, containers: &mut Vec<_>| {
            out.push_str(open);
            for (i, (label, item)) in items.enumerate() {
                if i > 0 {
                    out.push(',');
                }
                if let Some(l) = label {
                    out.push_str(l);
                    out.push(':');
                }
                let mut inner = String::new();
                canonical_form(item, containers, &mut inner);
                out.push_str(&inner);
            }
            out.push(')');
        };
    match s {
        Shape::Unknown => out.push('?'),
        Shape::Prim(p) => out.push_str(p),
        Shape::Opaque(p) => {
            out.push('!');
            out.push_str(p);
        }
        Shape::Option(x) => list("O(", &mut std::iter::once((None, &**x)), containers),
        Shape::Seq(x) => list("S(", &mut std::iter::once((None, &**x)), containers),
        Shape::Map(k, v) => list("M(", &mut [(None, &**k), (None, &**v)].into_iter(), containers),
        Shape::Tuple(xs) => list("T(", &mut xs.iter().map(|x| (None, x)), containers),
        Shape::Newtype(name, x) => {
            containers.push(name);
            canonical_form(x, containers, out);
            containers.pop();
        }
        Shape::TupleStruct(name, xs) => {
            containers.push(name);
            list("T(", &mut xs.iter().map(|x| (None, x)), containers);
            containers.pop();
        }
        Shape::Struct(name, fs) => {
            containers.push(name);
            list("R(", &mut fs.iter().map(|(f, x)| (Some(*f), x)), containers);
            containers.pop();
        }
        Shape::Enum(name, vs) => {
            containers.push(name);
            list("E(", &mut vs.iter().map(|(v, x)| (Some(*v), x)), containers);
            containers.pop();
        }
        Shape::Recursive(name) => {
            let up = containers.iter().rev().position(|c| c == name).unwrap_or(containers.len());
            out.push_str(&format!("^{up}"));
        }
    }
}

fn display_name(s: &Shape) -> String {
    match s {
        Shape::Unknown => "?".into(),
        Shape::Prim("str") => "String".into(),
        Shape::Prim("unit") => "()".into(),
        Shape::Prim(p) | Shape::Opaque(p) => (*p).into(),
        Shape::Option(x) => format!("Option<{}>", display_name(x)),
        Shape::Seq(x) => format!("Vec<{}>", display_name(x)),
        Shape::Map(k, v) => format!("Map<{}, {}>", display_name(k), display_name(v)),
        Shape::Tuple(xs) if xs.len() == 1 => format!("({},)", display_name(&xs[0])),
        Shape::Tuple(xs) => format!("({})", xs.iter().map(display_name).collect::<Vec<_>>().join(", ")),
        Shape::Newtype(n, _)
        | Shape::TupleStruct(n, _)
        | Shape::Struct(n, _)
        | Shape::Enum(n, _)
        | Shape::Recursive(n) => (*n).into(),
    }
}

/// A deserializer that records the shape it is asked for into `slot` and hands the visitor a
/// minimal value (one element per sequence, the planned variant of an enum).
struct Tracer<'a> {
    slot: &'a mut Shape,
    path: Path,
    pass: &'a mut Pass,
}

impl Tracer<'_> {
    fn child(&self, i: u32) -> Path {
        let mut p = self.path.clone();
        p.push(i);
        p
    }

    /// Enters a named container; too deep inside itself, the pass stops here.
    fn enter(&mut self, name: &'static str) -> Result<(), TraceError> {
        if self.pass.stack.iter().filter(|n| **n == name).count() >= MAX_NESTING {
            *self.slot = Shape::Recursive(name);
            self.pass.cut = Some(self.path.clone());
            return Err(TraceError::Cut);
        }
        self.pass.stack.push(name);
        Ok(())
    }

    fn escaped(&mut self) -> bool {
        self.pass.sites.push((self.path.clone(), Site::Escapable));
        self.pass.plan.get(&self.path) == Some(&Choice::Escape)
    }
}

/// Hands out one child slot per element.
struct Elements<'a> {
    slots: std::vec::IntoIter<(&'a mut Shape, Path)>,
    pass: &'a mut Pass,
}

impl<'de> de::SeqAccess<'de> for Elements<'_> {
    type Error = TraceError;
    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, TraceError> {
        match self.slots.next() {
            None => Ok(None),
            Some((slot, path)) => seed.deserialize(Tracer { slot, path, pass: self.pass }).map(Some),
        }
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.slots.len())
    }
}

impl<'de> de::MapAccess<'de> for Elements<'_> {
    type Error = TraceError;
    fn next_key_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, TraceError> {
        de::SeqAccess::next_element_seed(self, seed)
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, TraceError> {
        de::SeqAccess::next_element_seed(self, seed)?
            .ok_or_else(|| TraceError::Other("map value missing".into()))
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.slots.len() / 2)
    }
}

/// The planned variant of one enum.
struct Variant<'a> {
    chosen: u32,
    name: &'static str,
    tracer: Tracer<'a>,
}

impl<'de, 'a> de::EnumAccess<'de> for Variant<'a> {
    type Error = TraceError;
    type Variant = Self;
    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), TraceError> {
        let de: de::value::U32Deserializer<TraceError> = self.chosen.into_deserializer();
        Ok((seed.deserialize(de)?, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_> {
    type Error = TraceError;
    fn unit_variant(self) -> Result<(), TraceError> {
        *self.tracer.slot = Shape::Prim("unit");
        Ok(())
    }
    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, TraceError> {
        seed.deserialize(self.tracer)
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, TraceError> {
        de::Deserializer::deserialize_tuple(self.tracer, len, visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.tracer.fields(self.name, fields, visitor)
    }
}

/// Sets `slot` to `make(len)` and hands out its first `len` children.
fn elements<'b>(
    slot: &'b mut Shape,
    path: &Path,
    pass: &'b mut Pass,
    make: impl FnOnce(usize) -> Shape,
    len: usize,
) -> Elements<'b> {
    *slot = make(len);
    let slots: Vec<&'b mut Shape> = match slot {
        Shape::Tuple(xs) | Shape::TupleStruct(_, xs) => xs.iter_mut().collect(),
        Shape::Struct(_, fs) => fs.iter_mut().map(|(_, s)| s).collect(),
        Shape::Seq(x) | Shape::Option(x) => vec![&mut **x],
        Shape::Map(k, v) => vec![&mut **k, &mut **v],
        _ => Vec::new(),
    };
    let slots: Vec<(&'b mut Shape, Path)> = slots
        .into_iter()
        .take(len)
        .enumerate()
        .map(|(i, s)| {
            let mut p = path.clone();
            p.push(i as u32);
            (s, p)
        })
        .collect();
    Elements { slots: slots.into_iter(), pass }
}

impl Tracer<'_> {
    /// A struct's (or struct variant's) fields, in order.
    fn fields<'de, V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let make = |_| Shape::Struct(name, fields.iter().map(|f| (*f, Shape::Unknown)).collect());
        visitor.visit_seq(elements(self.slot, &self.path, self.pass, make, fields.len()))
    }

    /// Runs `f` inside the named container `name`, leaving it afterwards.
    fn within<T>(
        mut self,
        name: &'static str,
        f: impl FnOnce(Tracer<'_>) -> Result<T, TraceError>,
    ) -> Result<T, TraceError> {
        self.enter(name)?;
        let Tracer { slot, path, pass } = self;
        let v = f(Tracer { slot, path, pass: &mut *pass })?;
        pass.stack.pop();
        Ok(v)
    }
}

macro_rules! primitives {
    ($($method:ident => $visit:ident($value:expr) as $name:literal;)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
            *self.slot = Shape::Prim($name);
            visitor.$visit($value)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = TraceError;

    // Numbers are offered as 1, not 0: the most common validating types (`NonZero*`) accept it.
    primitives! {
        deserialize_bool => visit_bool(false) as "bool";
        deserialize_i8 => visit_i8(1) as "i8";
        deserialize_i16 => visit_i16(1) as "i16";
        deserialize_i32 => visit_i32(1) as "i32";
        deserialize_i64 => visit_i64(1) as "i64";
        deserialize_i128 => visit_i128(1) as "i128";
        deserialize_u8 => visit_u8(1) as "u8";
        deserialize_u16 => visit_u16(1) as "u16";
        deserialize_u32 => visit_u32(1) as "u32";
        deserialize_u64 => visit_u64(1) as "u64";
        deserialize_u128 => visit_u128(1) as "u128";
        deserialize_f32 => visit_f32(1.0) as "f32";
        deserialize_f64 => visit_f64(1.0) as "f64";
        deserialize_char => visit_char('a') as "char";
        deserialize_str => visit_str("") as "str";
        deserialize_string => visit_string(String::new()) as "str";
        deserialize_bytes => visit_bytes(&[]) as "bytes";
        deserialize_byte_buf => visit_byte_buf(Vec::new()) as "bytes";
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        *self.slot = Shape::Prim("unit");
        visitor.visit_unit()
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, TraceError> {
        *self.slot = Shape::Opaque("any");
        Err(TraceError::Other("the type needs a self-describing format".into()))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        self.deserialize_any(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, TraceError> {
        *self.slot = Shape::Opaque("identifier");
        Err(TraceError::Other("an identifier outside an enum".into()))
    }

    fn deserialize_option<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        if self.escaped() {
            *self.slot = Shape::Option(Box::new(Shape::Unknown));
            return visitor.visit_none();
        }
        let path = self.child(0);
        *self.slot = Shape::Option(Box::new(Shape::Unknown));
        let Shape::Option(inner) = self.slot else { unreachable!("set above") };
        visitor.visit_some(Tracer { slot: inner, path, pass: self.pass })
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        *self.slot = Shape::Prim("unit");
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.within(name, |t| {
            let path = t.child(0);
            *t.slot = Shape::Newtype(name, Box::new(Shape::Unknown));
            let Shape::Newtype(_, inner) = t.slot else { unreachable!("set above") };
            visitor.visit_newtype_struct(Tracer { slot: inner, path, pass: t.pass })
        })
    }

    fn deserialize_seq<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        let len = if self.escaped() { 0 } else { 1 };
        visitor.visit_seq(elements(
            self.slot,
            &self.path,
            self.pass,
            |_| Shape::Seq(Box::new(Shape::Unknown)),
            len,
        ))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, TraceError> {
        visitor.visit_seq(elements(
            self.slot,
            &self.path,
            self.pass,
            |n| Shape::Tuple(vec![Shape::Unknown; n]),
            len,
        ))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.within(name, |t| {
            let make = |n| Shape::TupleStruct(name, vec![Shape::Unknown; n]);
            visitor.visit_seq(elements(t.slot, &t.path, t.pass, make, len))
        })
    }

    fn deserialize_map<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        let len = if self.escaped() { 0 } else { 2 };
        let make = |_| Shape::Map(Box::new(Shape::Unknown), Box::new(Shape::Unknown));
        visitor.visit_map(elements(self.slot, &self.path, self.pass, make, len))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.within(name, |t| t.fields(name, fields, visitor))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.within(name, |t| {
            let n = variants.len() as u32;
            if n == 0 {
                *t.slot = Shape::Enum(name, Vec::new());
                return Err(TraceError::Other("an enum without variants has no value".into()));
            }
            let chosen = match t.pass.plan.get(&t.path) {
                Some(Choice::Variant(v)) if *v < n => *v,
                _ => 0,
            };
            t.pass.sites.push((t.path.clone(), Site::Enum { n, chosen }));
            let path = t.child(chosen);
            *t.slot = Shape::Enum(name, variants.iter().map(|v| (*v, Shape::Unknown)).collect());
            let Shape::Enum(_, vs) = t.slot else { unreachable!("set above") };
            let slot = &mut vs[chosen as usize].1;
            visitor.visit_enum(Variant {
                chosen,
                name: variants[chosen as usize],
                tracer: Tracer { slot, path, pass: t.pass },
            })
        })
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn canonical<T: DeserializeOwned>() -> String {
        let mut s = String::new();
        canonical_form(&trace::<T>(), &mut Vec::new(), &mut s);
        s
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    enum Event {
        Click { page: String, at: i64 },
        Idle,
        Tagged(Vec<String>, Option<u32>),
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Node {
        next: Option<Box<Node>>,
        value: u64,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    enum List {
        Cons(u64, Box<List>),
        Nil,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Wrapper<T>(T);

    #[test]
    fn primitives_and_std_containers_have_their_shape() {
        assert_eq!(canonical::<u64>(), "u64");
        assert_eq!(canonical::<(u64, i64)>(), "T(u64,i64)");
        assert_eq!(canonical::<Vec<String>>(), "S(str)");
        assert_eq!(canonical::<Option<u8>>(), "O(u8)");
        assert_eq!(canonical::<std::collections::BTreeMap<String, f64>>(), "M(str,f64)");
        assert_eq!(canonical::<()>(), "unit");
        assert_eq!(StateSchema::of::<(u64, i64)>().name, "(u64, i64)");
    }

    #[test]
    fn every_enum_variant_is_traced() {
        assert_eq!(canonical::<Event>(), "E(Click:R(page:str,at:i64),Idle:unit,Tagged:T(S(str),O(u32)))");
        assert_eq!(StateSchema::of::<Event>().name, "Event");
    }

    #[test]
    fn recursive_types_are_traced_to_a_fixed_depth_and_the_rest_of_their_shape() {
        assert_eq!(canonical::<Node>(), "R(next:O(R(next:O(^0),value:u64)),value:u64)");
        assert_eq!(canonical::<List>(), "E(Cons:T(u64,E(Cons:T(u64,^0),Nil:unit)),Nil:unit)");
        assert_ne!(canonical::<Wrapper<Wrapper<u64>>>(), canonical::<Wrapper<Wrapper<String>>>());
    }

    #[test]
    fn newtypes_are_transparent_and_names_do_not_count() {
        assert_eq!(StateSchema::of::<Wrapper<u64>>().fingerprint, StateSchema::of::<u64>().fingerprint);
        assert_ne!(StateSchema::of::<u64>().fingerprint, StateSchema::of::<i64>().fingerprint);
        assert_ne!(StateSchema::of::<u64>().fingerprint, StateSchema::of::<u32>().fingerprint);
    }

    /// Checkpoints store fingerprints: the canonical form and the hash must never change, or
    /// every job would be refused after an upgrade. (The values are also in
    /// docs/checkpoint-format.md.)
    #[test]
    fn fingerprints_are_stable_across_releases() {
        assert_eq!(StateSchema::of::<u64>().type_text("u64"), "u64#4d35d3193e8d66f2 u64");
        assert_eq!(format!("{:016x}", StateSchema::of::<(u64, i64)>().fingerprint), "729efab7d7ea2522");
    }

    #[test]
    fn type_text_round_trips_and_legacy_paths_stay_legacy() {
        let s = StateSchema::of::<Event>();
        let text = s.type_text("my_crate::model::Event");
        assert_eq!(
            TypeIdentity::parse(&text),
            TypeIdentity::Schema {
                name: "Event",
                fingerprint: s.fingerprint,
                rust_type: "my_crate::model::Event"
            }
        );
        assert_eq!(TypeIdentity::parse("offsets"), TypeIdentity::Legacy("offsets"));
        assert_eq!(TypeIdentity::parse(""), TypeIdentity::Legacy(""));
        assert_eq!(TypeIdentity::parse("a#12"), TypeIdentity::Legacy("a#12"));
    }
}
