//! The runtime: `Engine` (shared, immutable: model + experts + gate), `Session` (KV cache,
//! history, blend), generation and sampling, and the `Blend` type.

mod blend;
mod engine;
mod prompts;
mod session;
pub mod threads;

pub use blend::{Blend, Combine, Mode, RowPlan, View, CONSERVATIVE, PROGRESSIVE};
pub use engine::{adapter_fits, shipped_adapters, DecodeStep, Engine, EngineOptions};
pub use prompts::{PromptCache, PromptCacheStats};
pub use session::{feed_together, GenParams, Piece, Reply, Session, StopReason, Turn};
