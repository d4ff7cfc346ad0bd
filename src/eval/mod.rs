//! Evaluation: forced-choice scoring of instruments, blend sweeps, side effects (perplexity,
//! safety), the open-ended stance judge, and reports with plots.
//!
//! Everything here is a library call; `stancemix eval`, `sweep` and `report` only parse and print.

pub mod forced_choice;
pub mod judge;
pub mod open_ended;
pub mod plot;
pub mod report;
pub mod sections;
pub mod side_effects;
pub mod stats;
pub mod sweep;
pub mod templates;

pub use forced_choice::{
    score_instrument, AxisScore, BlendScore, Control, FcOptions, Report, Variant,
};
pub use sweep::{parse_path, sweep, SweepPath, SweepPoint, SweepReport};
pub use templates::{Order, Template, FIRST_WORDS, TEMPLATES};
