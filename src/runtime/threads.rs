//! How candle uses the CPU cores, and the settings that run it fastest here.
//!
//! candle runs f32 matmuls on rayon (`RAYON_NUM_THREADS`, read on every matmul) and its
//! elementwise and quantized ops on a separate pool of spinning workers (`CANDLE_NUM_THREADS`,
//! by default as many as rayon; read once, when first used). During f32 prompt scoring the two
//! pools compete for the same cores: on the 2-core machine a 30-token, 11-row forward took
//! 1.0-1.7 s with both at 2 threads, 0.6-0.7 s with candle's pool at 1, and 0.93 s with
//! everything on one thread, where two such workers side by side each still took 0.9-1.1 s
//! ("Sweep time" in docs/BENCHMARKS.md). Quantized decoding is the other way round: it needs
//! candle's pool (59 tok/s on one thread, 110 on two).

/// Fix candle's thread count for the process: unless `RAYON_NUM_THREADS` is set, set it to the
/// count candle would pick. Without it candle asks the OS for the number of cores (parsing
/// `/proc/cpuinfo` on Linux) on every f32 matmul: 3-4% of decoding time when the attention ran
/// on f32 matmuls, and 13% of a scoring run's samples were in the kernel. Call it at the start of
/// `main`, before other threads run.
pub fn pin_default() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// The thread settings for a process whose heavy work is forced-choice scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoringThreads {
    /// Scoring workers to run (each scores its own run of prompts).
    pub workers: usize,
    /// True when the process's candle pools were set to one thread each.
    pub single_threaded_ops: bool,
}

/// The machine's cores (1 when unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Set up the process for scoring with `workers` workers (`None`: one per core). Unless the user
/// set `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS`: with more than one worker both are set to 1,
/// so each worker runs candle on its own core; with one worker candle's own pool is set to 1 and
/// rayon's matmuls keep every core.
///
/// Call it at the start of `main`, before any other thread runs and before the first tensor
/// operation (candle reads the variables once); later calls cannot change candle's pools.
pub fn setup_for_scoring(workers: Option<usize>) -> ScoringThreads {
    let user_set = ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    let workers = workers.unwrap_or_else(cores).max(1);
    if workers > 1 && !user_set {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        return ScoringThreads {
            workers,
            single_threaded_ops: true,
        };
    }
    if !user_set {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    pin_default();
    ScoringThreads {
        workers,
        single_threaded_ops: false,
    }
}
