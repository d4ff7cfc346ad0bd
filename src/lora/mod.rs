//! Experts: LoRA adapter files (PEFT layout) and steering vectors (llama.cpp control vectors),
//! the stacked expert set with its per-row hook, and merging into a new model file.

mod adapter;
mod experts;
mod export;
mod merge;
pub mod steer;

pub use adapter::{
    peft_tensor_name, permute_rows, Adapter, AdapterConfig, BaseModel, LoraPair, CONFIG_FILE,
    WEIGHTS_FILE,
};
pub use experts::{ExpertHook, ExpertPrecision, ExpertSet};
pub use export::export_blend;
pub use merge::merge_to_gguf;
