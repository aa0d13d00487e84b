//! `mor plot`: one metric of several runs in one chart and table.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args)]
pub struct PlotArgs {
    /// Run directories (with metrics.jsonl), each optionally labelled as `DIR=LABEL`.
    #[arg(required = true)]
    pub runs: Vec<String>,
    /// Metric to plot: a key of metrics.jsonl (val_loss, val_loss_causal, loss, ...).
    #[arg(long, default_value = "val_loss")]
    pub metric: String,
    /// x axis: step or tokens.
    #[arg(long, default_value = "step")]
    pub x: String,
    /// Chart title (default: the metric).
    #[arg(long)]
    pub title: Option<String>,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
}

/// Draw `mor plot` and return its markdown table: one row per x value, one column per run.
pub fn run_plot(a: &PlotArgs) -> Result<String> {
    let mut series = Vec::new();
    for spec in &a.runs {
        let (dir, label) = match spec.split_once('=') {
            Some((d, l)) => (PathBuf::from(d), l.to_string()),
            None => (PathBuf::from(spec), spec.clone()),
        };
        let path = dir.join(mor::train::trainer::METRICS_FILE);
        let records = mor::train::metrics::read_metrics(&path)
            .with_context(|| format!("reading the metrics of run {}", dir.display()))?;
        let points = mor::train::metrics::metric_points(&records, &a.x, &a.metric);
        if points.is_empty() {
            bail!(
                "{} has no record with both {:?} and {:?}",
                path.display(),
                a.x,
                a.metric
            );
        }
        series.push(mor::train::plot::Series {
            name: label,
            points,
        });
    }
    let title = a
        .title
        .clone()
        .unwrap_or_else(|| a.metric.replace('_', " "));
    mor::train::plot::plot_curves(&a.out, &title, &a.x, &a.metric, &series)?;
    let mut xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut table = format!(
        "| {} | {} |\n|---|{}\n",
        a.x,
        series
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(series.len())
    );
    for x in xs {
        let cells: Vec<String> = series
            .iter()
            .map(|s| match s.points.iter().rev().find(|p| p.0 == x) {
                Some(p) => format!("{:.4}", p.1),
                None => String::new(),
            })
            .collect();
        table += &format!("| {x} | {} |\n", cells.join(" | "));
    }
    table += &format!("\nplot: {}\n", a.out.display());
    Ok(table)
}
