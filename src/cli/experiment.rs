//! `mor experiment`: studies made of many training runs; `isoflop` reproduces the paper's isoFLOP comparison
//! (Tables 3 and 9) at a small scale (docs/isoflop.md).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use mor::train::isoflop::{Study, StudyOptions};

/// Subcommands of `mor experiment`.
#[derive(Subcommand)]
pub enum ExperimentCommand {
    /// Train vanilla, recursive and MoR models at equal FLOPs budgets and compare held-out NLL, depth and decode
    /// throughput (resumable: completed runs are skipped).
    Isoflop(IsoflopArgs),
}

/// Flags of `mor experiment isoflop`; unset values take the defaults of [`StudyOptions`].
#[derive(Args)]
pub struct IsoflopArgs {
    /// Prepared corpus directory (from `mor prepare`; scripts/fetch_study_corpus.sh makes assets/isoflop/corpus).
    #[arg(long)]
    pub data: PathBuf,
    /// Study directory (runs/, isoflop.md, isoflop.png); an existing study continues.
    #[arg(long)]
    pub out: PathBuf,
    /// FLOPs budgets, comma-separated, in the paper's convention (forward FLOPs without the LM head)
    /// [default: 1e12,2e12,4e12].
    #[arg(long, value_delimiter = ',')]
    pub budgets: Option<Vec<f64>>,
    /// Only the smallest budget (5–11 minutes on 2 idle cores with the defaults, by CPU). Its runs are the full
    /// study's first budget, so the full study started later in the same --out skips them.
    #[arg(long)]
    pub quick: bool,
    /// Variants, comma-separated: vanilla, recursive-N, mor-expert-N, mor-token-N, `+kv` for recursive KV sharing
    /// [default: vanilla,recursive-3,mor-expert-3,mor-expert-3+kv,mor-token-3].
    #[arg(long, value_delimiter = ',')]
    pub variants: Option<Vec<String>>,
    /// Seed of the initialisation and the data order [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Unrolled layers of every variant [default: 8].
    #[arg(long)]
    pub layers: Option<usize>,
    /// Model width [default: 128].
    #[arg(long)]
    pub hidden_size: Option<usize>,
    /// Attention heads [default: 4].
    #[arg(long)]
    pub heads: Option<usize>,
    /// Tokens per sequence [default: 256].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per step [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: 3e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Held-out windows scored [default: 64].
    #[arg(long)]
    pub eval_sequences: Option<usize>,
    /// Checkpoint interval in steps [default: 50].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Timed decode rounds per model [default: 3].
    #[arg(long)]
    pub decode_rounds: Option<usize>,
    /// Print the plan (steps, tokens and FLOPs of every run) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Hide the progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// The study settings of the flags.
fn options(a: &IsoflopArgs) -> StudyOptions {
    let mut o = StudyOptions::default();
    if let Some(b) = &a.budgets {
        o.budgets = b.clone();
    }
    if a.quick {
        let min = o.budgets.iter().copied().fold(f64::INFINITY, f64::min);
        o.budgets = vec![min];
    }
    if let Some(v) = &a.variants {
        o.variants = v.clone();
    }
    macro_rules! set {
        ($($flag:ident => $field:expr),*) => {$(if let Some(x) = a.$flag { $field = x; })*};
    }
    set!(seed => o.seed, layers => o.layers, hidden_size => o.hidden_size, heads => o.heads,
         seq_len => o.seq_len, batch_size => o.batch_size, lr => o.lr, eval_sequences => o.eval_sequences,
         save_every => o.save_every, decode_rounds => o.decode.rounds);
    o
}

/// Run `mor experiment`.
pub fn run_experiment(c: &ExperimentCommand) -> Result<()> {
    match c {
        ExperimentCommand::Isoflop(a) => run_isoflop(a),
    }
}

fn run_isoflop(a: &IsoflopArgs) -> Result<()> {
    let study = Study::plan(&options(a), &a.data, &a.out)?;
    print!("{}", study.plan_table());
    if a.dry_run {
        return Ok(());
    }
    let report = study.run(!a.quiet)?;
    print!("\n{}", report.table);
    println!(
        "wrote {} and {}",
        report.table_path.display(),
        report.plot_path.display()
    );
    Ok(())
}
