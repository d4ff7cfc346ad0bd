//! stancemix: build, serve and measure stance-steered language models.
//!
//! One base LLM, two LoRA experts (progressive, conservative) and a small trained gate. The
//! [`Engine`] holds them; a [`Session`] answers with a [`Blend`] of the experts, set by a dial,
//! a mix, raw weights, or routed per prompt by the gate.

pub mod data;
pub mod error;
pub mod eval;
pub mod lora;
pub mod model;
pub mod router;
pub mod runtime;
pub mod serve;
pub mod train;
pub mod util;

pub use error::{Error, Result};
pub use runtime::{Blend, Engine, EngineOptions, GenParams, Mode, Reply, Session};
