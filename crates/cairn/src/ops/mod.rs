//! Operators that extend [`DStream`](crate::DStream): keyed aggregation, keyed state, windows.

pub(crate) mod keyed;
pub(crate) mod migration;
pub(crate) mod stateful;
pub(crate) mod window;
