//! rayvisor placement engine.
//!
//! A pure library: no I/O, no clock. The engine reads an immutable
//! [`ClusterSnapshot`] and returns decisions ([`plan`], [`Session`]); the
//! rebalancing planner ([`rebalance::plan`]) returns live migrations; the
//! simulator ([`run_sim`]) replays a trace against the engine and three
//! baselines, with time injected by the caller.
//!
//! Pipeline (after the Kubernetes scheduling framework and Nomad's
//! stack): quota -> filters ([`filter`], each refusal recorded with its
//! reason) -> candidate lookup through free-resource indexes -> scorers
//! ([`score`], documented ranges) -> choice -> preemption ([`preempt`]) if
//! nothing fits.

pub mod engine;
pub mod error;
pub mod filter;
mod generate;
pub mod model;
pub mod preempt;
pub mod rebalance;
pub mod scenario;
pub mod score;
pub mod sim;
pub mod state;
pub mod status;

pub use engine::{plan, Decision, EngineConfig, PendingReason, Plan, Session, Strategy};
pub use error::{EngineError, ModelError, ScenarioError, SimError};
pub use filter::{Explanation, FilterKind, Reject};
pub use model::*;
pub use rebalance::{Move, MoveReason, RebalanceOptions, RebalancePlan};
pub use scenario::{Scenario, TraceEvent, TraceKind};
pub use sim::{run_sim, Baselines, Ratios, SimOptions, SimReport, StrategyReport};
pub use state::ClusterState;
pub use status::{transition, HostEvent, HostStatus, InvalidTransition};
