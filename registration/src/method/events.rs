//! What the method reports while it runs: typed stages and events, for progress displays and
//! logs; the library draws nothing itself.

use std::fmt;

use serde::{Serialize, Serializer};

/// A step of the method, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Feature maps of both images.
    Features,
    /// The start: header, centre of mass, translation search or label search.
    Start,
    /// The 12-parameter affine stage.
    Affine,
    /// The discrete displacement search before the first deformable level.
    Discrete,
    /// Deformable level `k`, counted from 1 (coarsest).
    Deformable(usize),
}

impl Stage {
    /// Whether the stage reports iterations (the others are single steps).
    pub fn iterates(self) -> bool {
        matches!(self, Stage::Affine | Stage::Deformable(_))
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Features => f.write_str("features"),
            Stage::Start => f.write_str("initialisation"),
            Stage::Affine => f.write_str("affine"),
            Stage::Discrete => f.write_str("discrete"),
            Stage::Deformable(k) => write!(f, "deformable-{k}"),
        }
    }
}

impl Serialize for Stage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The loss of one iteration of an optimised stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LossRecord {
    pub stage: Stage,
    pub iteration: usize,
    pub loss: f64,
}

/// What the method is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// A stage starts.
    Started(Stage),
    /// An iteration of an optimised stage finished.
    Iteration(LossRecord),
}

/// Receives the method's events; any `FnMut(Event)` is one.
pub trait Observer {
    fn event(&mut self, e: Event);
}

impl<F: FnMut(Event)> Observer for F {
    fn event(&mut self, e: Event) {
        self(e)
    }
}

/// An observer that ignores everything.
pub fn silent() -> impl Observer {
    |_: Event| {}
}
