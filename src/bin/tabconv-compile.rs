//! `tabconv-compile`: run a pass pipeline on an ONNX model and write a `.tcv`.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use tabconv::compile::{Compiled, Emit, Job};
use tabconv::dataset::Source;
use tabconv::ir::dump::dump;
use tabconv::onnx::tcv;
use tabconv::passes::mask::PathPoint;
use tabconv::passes::pipeline::Pipeline;
use tabconv::{Error, Result};

#[derive(Parser)]
#[command(
    name = "tabconv-compile",
    version,
    about = "Compile an ONNX CNN into a tabconv .tcv model",
    after_help = "Examples:\n  tabconv-compile fixtures/models/lenet5.onnx -o lenet5.tcv --pipeline exact\n  \
                  tabconv-compile model.onnx -o model.tcv --pipeline my.yaml --report report.json\n  \
                  tabconv-compile model.onnx -o model.tcv --dump-after conv-to-im2col"
)]
struct Args {
    /// The ONNX model to compile
    #[arg(required_unless_present = "list_passes")]
    model: Option<PathBuf>,
    /// Output .tcv file (written atomically: nothing appears there if the compile fails or is
    /// interrupted)
    #[arg(short, long, required_unless_present = "list_passes")]
    output: Option<PathBuf>,
    /// What to write: a .tcv (tabconv's interpreter), or standard ONNX (lookups lowered to
    /// MatMul/ArgMin/Gather/ReduceSum; runs in ONNX Runtime and tract, not channels-last, slower
    /// than the .tcv in tabconv)
    #[arg(long, value_enum, default_value = "tcv")]
    emit: Emit,
    /// List the built-in pipelines, their passes and every option `--set` accepts (with its
    /// value in that pipeline), then exit
    #[arg(long)]
    list_passes: bool,
    /// A built-in pipeline name (tabconv, exact, all-lut) or a pipeline YAML file
    #[arg(long, default_value = "tabconv")]
    pipeline: String,
    /// Override a pass option: PASS.PARAM=VALUE (repeatable)
    #[arg(long = "set", value_name = "PASS.PARAM=VALUE")]
    sets: Vec<String>,
    /// Calibration images (needed by pipelines that learn tables): float32 NCHW .npy, IDX
    /// (optionally .gz) or CIFAR .bin
    #[arg(long)]
    calib: Option<PathBuf>,
    #[command(flatten)]
    pre: tabconv::dataset::PreArgs,
    /// Labelled validation images for accuracy-driven masking (mask.max_accuracy_drop)
    #[arg(long, requires = "val_labels")]
    val: Option<PathBuf>,
    /// Labels of --val (.npy, IDX or CIFAR .bin)
    #[arg(long)]
    val_labels: Option<PathBuf>,
    /// Write an SVG plot of the masking path (quality vs op reduction)
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Seed for everything random in the passes
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a JSON compile report here
    #[arg(long)]
    report: Option<PathBuf>,
    /// Print the IR after this pass (repeatable)
    #[arg(long = "dump-after", value_name = "PASS")]
    dump_after: Vec<String>,
}

/// Blocks of 4 KiB or more on 64-byte boundaries (see `tabconv::alloc`).
#[global_allocator]
static ALLOC: tabconv::alloc::CacheAligned = tabconv::alloc::CacheAligned;

fn main() -> ExitCode {
    tabconv::cli::restore_sigpipe();
    tabconv::cli::keep_freed_memory();
    tabconv::output::remove_temp_files_on_signal();
    match compile(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--list-passes`: every built-in pipeline's passes and their options as `--set` names them.
fn list_passes() -> Result<()> {
    for (name, _) in tabconv::passes::pipeline::BUILTIN {
        let pipeline = Pipeline::find(name)?;
        println!("pipeline '{name}':");
        for pass in pipeline.build() {
            println!("  {}", pass.name());
            if let Some(params) = pass.params().as_object() {
                for (k, v) in params {
                    let v = match v {
                        serde_json::Value::String(s) => s.clone(),
                        // options are f32: print the value, not its f64 widening
                        serde_json::Value::Number(n) if n.is_f64() => (n.as_f64().unwrap_or(0.0) as f32).to_string(),
                        v => v.to_string(),
                    };
                    println!("    --set {}.{k}={v}", pass.name());
                }
            }
        }
    }
    println!("(pipeline YAML files take the same pass names and options; see README.md)");
    Ok(())
}

fn compile(args: Args) -> Result<()> {
    if args.list_passes {
        return list_passes();
    }
    let (Some(model), Some(output)) = (args.model.clone(), args.output.clone()) else {
        return Err(Error::Input("give the model and -o OUTPUT".into()));
    };
    let mut pipeline = Pipeline::find(&args.pipeline)?;
    for s in &args.sets {
        pipeline.set(s)?;
    }
    args.emit.adapt(&mut pipeline);
    for d in &args.dump_after {
        if !pipeline.build().iter().any(|p| p.name() == d) {
            return Err(Error::Input(format!(
                "--dump-after {d}: pipeline '{}' has no such pass",
                pipeline.name
            )));
        }
    }
    let job = Job {
        model,
        output,
        pipeline,
        emit: args.emit,
        calib: args.calib.clone().map(Source::File),
        val: args.val.clone().map(Source::File),
        val_labels: args.val_labels.clone().map(Source::File),
        pre: args.pre.get()?,
        seed: args.seed,
        verbose: true,
        // Ctrl-C here is the signal handler of `tabconv::output` (the temp file removed)
        cancel: None,
    };
    // the output's temp file exists from the start: an unwritable folder fails at once, and an
    // interrupt (SIGINT, SIGTERM) removes it (see tabconv::output)
    let done = tabconv::compile::compile(job, |pass, g| {
        if args.dump_after.iter().any(|d| d == pass) {
            println!("// IR after {pass}\n{}", dump(g)?);
        }
        Ok(())
    })?;
    print_summary(&done);
    match (&done.report.mask, &args.plot) {
        (Some(m), Some(p)) => {
            let title = format!(
                "{} — masking path",
                done.model.file_stem().unwrap_or_default().to_string_lossy()
            );
            tcv::write_atomic(p, tabconv::plot::mask_path_svg(m, &title)?.as_bytes())?;
        }
        (None, Some(_)) => eprintln!("  note: --plot ignored: the pipeline has no mask pass"),
        _ => {}
    }
    print_costs(&done);
    if let Some(r) = &args.report {
        tcv::write_atomic(r, serde_json::to_string_pretty(&done.json()).expect("json").as_bytes())?;
    }
    Ok(())
}

/// The passes, the notes, the LUT layers and the masking decisions, on stderr.
fn print_summary(done: &Compiled) {
    let report = &done.report;
    eprintln!(
        "{} -> {} (pipeline '{}')",
        done.model.display(),
        done.output.display(),
        report.pipeline
    );
    eprintln!(
        "  {:<18} {:>9} {:>11} {:>7} {:>8} {:>14}",
        "pass", "ms", "nodes", "added", "removed", "MACs/image"
    );
    for p in &report.passes {
        eprintln!(
            "  {:<18} {:>9.2} {:>5} → {:<4} {:>7} {:>8} {:>14}",
            p.pass, p.millis, p.nodes_before, p.nodes_after, p.added, p.removed, p.macs_after
        );
    }
    for n in &report.notes {
        eprintln!("  note: {n}");
    }
    if !report.lut_layers.is_empty() {
        eprintln!(
            "  {:<40} {:>5} {:>6} {:>5} {:>3} {:>4} {:>9} {:>8} {:>6} {:>7}  learned (held-out error of its objective)",
            "lut layer", "D", "M", "C", "S", "K", "rel err", "cosine", "ridge", "sec"
        );
        for l in &report.lut_layers {
            let learned = match &l.learn {
                Some(r) => format!(
                    "{} {:.4} → {:.4} ({:.1} s)",
                    r.objective, r.error_before, r.error_after, r.seconds
                ),
                None => "-".into(),
            };
            eprintln!(
                "  {:<40} {:>5} {:>6} {:>5} {:>3} {:>4} {:>9.4} {:>8.5} {:>6} {:>7.2}  {learned}",
                l.node, l.d, l.m, l.codebooks, l.subspace, l.k, l.output_rel_error, l.output_cosine, l.ridge, l.seconds
            );
        }
    }
    if let Some(g) = &report.global {
        eprintln!(
            "  global stage: KL {:.4} → {:.4}, top-1 agreement with the exact model {:.2} % → {:.2} % on {} held-out images, epoch {} kept (KL per epoch: {}), {:.1} s",
            g.kl_before,
            g.kl_after,
            100.0 * g.agree_before,
            100.0 * g.agree_after,
            g.images / 8,
            g.best_epoch,
            g.epochs.iter().map(|p| format!("{:.4}", p.kl)).collect::<Vec<_>>().join(", "),
            g.seconds
        );
    }
    if let Some(m) = &report.mask {
        eprintln!("  masking ({} on {}; target {}):", m.metric, m.measured_on, m.target);
        eprintln!(
            "  {:<44} {:>4} {:>9} {:>11} {:>9} {:>8} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6}  why",
            "layer",
            "kind",
            "D×M",
            "exact MACs",
            "enc MACs",
            "enc cmp",
            "lookups",
            "table B",
            "est ×",
            "layer cos",
            "logit cos",
            "choice"
        );
        for d in &m.layers {
            eprintln!(
                "  {:<44} {:>4} {:>9} {:>11} {:>9} {:>8} {:>9} {:>9} {:>6.2} {:>9.5} {:>9.5} {:>6}  {}",
                d.layer,
                d.kind,
                format!("{}×{}", d.shape[0], d.shape[1]),
                d.exact_macs,
                d.lut_cost.encode_macs,
                d.lut_cost.encode_compares,
                d.lut_cost.lookups,
                d.lut_cost.table_bytes,
                d.est_speedup,
                d.layer_cosine,
                d.logit_cosine_alone,
                d.chosen,
                d.why
            );
        }
        let measured = |p: &PathPoint| measures(p, m.exact_accuracy);
        let c = &m.path[m.chosen_point];
        let pct = |p: &PathPoint| p.reduction_everything_counted * 100.0;
        eprintln!(
            "  chosen: reduction {:.1}% (everything counted), {}",
            pct(c),
            measured(c)
        );
        if let Some(p) = m.pruned.last() {
            eprintln!(
                "  after pruning ({} layer(s) put back as lookups): reduction {:.1}%, {}",
                m.pruned.len(),
                pct(p),
                measured(p)
            );
        }
        if let Some(f) = &m.final_point {
            eprintln!("  after relearning: reduction {:.1}%, {}", pct(f), measured(f));
        }
        if let Some(p) = m.pruned_after_relearning.last() {
            let again = m.relearned_again();
            eprintln!(
                "  then ({} layer(s) put back as lookups{}): reduction {:.1}%, {}",
                m.pruned_after_relearning.len() - again,
                match again {
                    0 => String::new(),
                    n => format!(", relearned {n} more time(s)"),
                },
                pct(p),
                measured(p)
            );
        }
        if let Some(r) = m.refined.last() {
            let relearned = r.restored.as_deref() == Some(tabconv::passes::mask::RELEARNED_AFTER_REFINING);
            eprintln!(
                "  after refining ({} layer(s) refitted{}): reduction {:.1}%, {}",
                m.refined.len() - usize::from(relearned),
                if relearned { "; then relearned" } else { "" },
                pct(r),
                measured(r)
            );
        }
        if let Some(c) = &m.confirmation {
            let on_held_out = |p: &PathPoint| measures(p, c.exact_accuracy);
            eprintln!(
                "  on {} held-out {} images (mask.confirm): {}",
                c.images,
                if c.exact_accuracy.is_some() {
                    "validation"
                } else {
                    "calibration"
                },
                on_held_out(&c.points[0])
            );
            if let (Some(last), Some(chosen_on)) = (c.points.last(), &c.chosen_on) {
                let mut what = match (c.undone, c.points.len() - 1 - c.undone - c.given_back) {
                    (0, r) => format!("restoring {r} layer(s)"),
                    (u, 0) => format!("undoing {u} refine step(s)"),
                    (u, r) => format!("undoing {u} refine step(s) and restoring {r} layer(s)"),
                };
                if c.given_back > 0 {
                    what += &format!(", then giving {} of them back as lookups,", c.given_back);
                }
                eprintln!(
                    "  after {what} to confirm: reduction {:.1}%, {}; on the images chosen on: {}",
                    pct(last),
                    on_held_out(last),
                    measured(chosen_on)
                );
            }
        }
    }
}

/// A masking point's logit measures and, with a validation set, its accuracy.
/// The accuracy comes with its drop from the exact model's and that drop's standard error, the
/// noise of measuring it on this many validation images.
fn measures(p: &PathPoint, exact_accuracy: Option<f64>) -> String {
    let accuracy = match (p.accuracy, exact_accuracy, p.drop_se) {
        (Some(a), Some(e), Some(se)) => format!(
            ", accuracy {:.2}% (drop {:.2} ± {:.2} points, one standard error)",
            a * 100.0,
            (e - a) * 100.0,
            se
        ),
        (Some(a), ..) => format!(", accuracy {:.2}%", a * 100.0),
        _ => String::new(),
    };
    format!(
        "logit cosine {:.5}, expected drop {:.2} ± {:.2} points{accuracy}",
        p.logit_cosine, p.expected_drop, p.expected_drop_se
    )
}

/// Arithmetic and memory before and after, on stderr.
fn print_costs(done: &Compiled) {
    let (source, after) = (&done.cost_before, &done.cost_after);
    let (red_lookups, red_all) = done.reductions();
    eprintln!(
        "  exact MACs/image {} → {}; encode {} MACs + {} compares; {} lookups",
        source.exact_macs, after.exact_macs, after.encode_macs, after.encode_compares, after.lookups
    );
    eprintln!(
        "  reduction {:.1}% lookups only, {:.1}% everything counted; tables {} B + prototypes {} B vs weights {} B",
        red_lookups * 100.0,
        red_all * 100.0,
        after.table_bytes,
        after.prototype_bytes,
        done.source_weight_bytes
    );
    eprintln!("  wrote {} bytes", done.output_bytes);
}
