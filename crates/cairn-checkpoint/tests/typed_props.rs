//! The shape-driven codec against the real thing: random values of user-like types (structs,
//! every kind of enum variant, nested options, maps, tuples, recursion), encoded by postcard as
//! the engine does, must decode to the JSON serde_json writes for them (with the documented
//! exceptions) and encode back to the very same bytes.

use cairn_checkpoint::{schema::TypeShape, typed};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Event {
    Started,
    Clicked(u32),
    Moved(i16, i16),
    Bought { sku: String, cents: i64, coupon: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Meters(f64);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Session {
    user: u64,
    events: Vec<Event>,
    tags: BTreeMap<String, u8>,
    by_hour: BTreeMap<u8, (i32, bool)>,
    distance: Meters,
    initial: char,
    big: u128,
    signed_big: i128,
    raw: Vec<u8>,
}

/// A recursive type: a tree of sessions' labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Tree {
    Leaf(String),
    Node(Box<Tree>, Box<Tree>),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        Just(Event::Started),
        any::<u32>().prop_map(Event::Clicked),
        (any::<i16>(), any::<i16>()).prop_map(|(a, b)| Event::Moved(a, b)),
        (".{0,8}", any::<i64>(), proptest::option::of(".{0,4}"))
            .prop_map(|(sku, cents, coupon)| Event::Bought { sku, cents, coupon }),
    ]
}

fn session() -> impl Strategy<Value = Session> {
    (
        any::<u64>(),
        proptest::collection::vec(event(), 0..5),
        proptest::collection::btree_map(".{0,6}", any::<u8>(), 0..4),
        proptest::collection::btree_map(any::<u8>(), (any::<i32>(), any::<bool>()), 0..4),
        -1e12f64..1e12,
        any::<char>(),
        any::<u128>(),
        any::<i128>(),
        proptest::collection::vec(any::<u8>(), 0..6),
    )
        .prop_map(|(user, events, tags, by_hour, d, initial, big, signed_big, raw)| Session {
            user,
            events,
            tags,
            by_hour,
            distance: Meters(d),
            initial,
            big,
            signed_big,
            raw,
        })
}

fn tree() -> impl Strategy<Value = Tree> {
    ".{0,4}".prop_map(Tree::Leaf).prop_recursive(4, 16, 2, |inner| {
        (inner.clone(), inner).prop_map(|(a, b)| Tree::Node(Box::new(a), Box::new(b)))
    })
}

/// What the codec should give: serde_json's writing, with maps whose keys are not strings as
/// `[key, value]` pairs and 128-bit integers past 64 bits as strings.
fn expected_session(s: &Session) -> serde_json::Value {
    // serde_json cannot hold 128-bit integers: those fields are set below.
    let mut v = serde_json::to_value(Session { big: 0, signed_big: 0, ..s.clone() }).unwrap();
    v["by_hour"] = serde_json::Value::Array(
        s.by_hour.iter().map(|(h, (a, b))| serde_json::json!([h, [a, b]])).collect(),
    );
    let wide = |x: i128| match i64::try_from(x) {
        Ok(i) => serde_json::json!(i),
        Err(_) => {
            u64::try_from(x).map_or_else(|_| serde_json::json!(x.to_string()), |u| serde_json::json!(u))
        }
    };
    v["big"] =
        u64::try_from(s.big).map_or_else(|_| serde_json::json!(s.big.to_string()), |u| serde_json::json!(u));
    v["signed_big"] = wide(s.signed_big);
    v
}

proptest! {
    #[test]
    fn sessions_decode_to_their_json_and_encode_back_to_the_same_bytes(s in session()) {
        let shape = TypeShape::of::<Session>();
        let bytes = postcard::to_allocvec(&s).unwrap();
        let json = typed::decode(&shape, &bytes).unwrap();
        prop_assert_eq!(&json, &expected_session(&s));
        prop_assert_eq!(typed::encode(&shape, &json).unwrap(), bytes);
    }

    #[test]
    fn recursive_types_round_trip(t in tree()) {
        let shape = TypeShape::of::<Tree>();
        let bytes = postcard::to_allocvec(&t).unwrap();
        let json = typed::decode(&shape, &bytes).unwrap();
        prop_assert_eq!(&json, &serde_json::to_value(&t).unwrap());
        prop_assert_eq!(typed::encode(&shape, &json).unwrap(), bytes);
    }

    #[test]
    fn nested_options_keep_some_none_apart(x in proptest::option::of(proptest::option::of(any::<i8>()))) {
        let shape = TypeShape::of::<Option<Option<i8>>>();
        let bytes = postcard::to_allocvec(&x).unwrap();
        let json = typed::decode(&shape, &bytes).unwrap();
        let want = match x {
            None => serde_json::Value::Null,
            Some(inner) => serde_json::json!([inner]),
        };
        prop_assert_eq!(&json, &want);
        prop_assert_eq!(typed::encode(&shape, &json).unwrap(), bytes);
    }
}

/// Edited JSON that does not fit the shape is refused with a reason, never encoded wrongly.
#[test]
fn json_that_does_not_fit_is_refused_with_a_reason() {
    let shape = TypeShape::of::<Event>();
    for (bad, why) in [
        (serde_json::json!("Jumped"), "has no variant \"Jumped\""),
        (serde_json::json!({"Clicked": -1}), "does not fit in u32"),
        (serde_json::json!({"Bought": {"sku": "a", "cents": 1}}), "field \"coupon\" is missing"),
        (
            serde_json::json!({"Bought": {"sku": "a", "cents": 1, "coupon": null, "x": 1}}),
            "has no field \"x\"",
        ),
        (serde_json::json!({"Moved": [1]}), "expected 2 elements"),
        (serde_json::json!("Clicked"), "needs content"),
    ] {
        let err = typed::encode(&shape, &bad).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
    assert!(typed::decode(&shape, &[9]).unwrap_err().contains("no variant number 9"));
    assert!(typed::decode(&shape, &[1]).unwrap_err().contains("ends early"));
    assert!(typed::decode(&TypeShape::of::<u8>(), &[1, 2]).unwrap_err().contains("left over"));
}

/// A generic wrapper nested in itself is two different types, not a recursion.
#[test]
fn a_generic_wrapper_nested_in_itself_is_not_taken_for_recursion() {
    #[derive(Serialize, Deserialize)]
    struct W<T> {
        x: T,
        n: u8,
    }
    let v = W { x: W { x: 7u64, n: 1 }, n: 2 };
    let shape = TypeShape::of::<W<W<u64>>>();
    let bytes = postcard::to_allocvec(&v).unwrap();
    let json = typed::decode(&shape, &bytes).unwrap();
    assert_eq!(json, serde_json::json!({"x": {"x": 7, "n": 1}, "n": 2}));
    assert_eq!(typed::encode(&shape, &json).unwrap(), bytes);
}
