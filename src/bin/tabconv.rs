//! `tabconv`: run, evaluate and inspect `.onnx` models with tabconv's own interpreter.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tabconv::dataset::{Labelled, PreArgs, Preprocess, Source};
use tabconv::ir::{cost, dump::dump, Graph, Op, Tensor};
use tabconv::model::Runner;
use tabconv::{data, model, Error, Result};

#[derive(Parser)]
#[command(
    name = "tabconv",
    version,
    about = "Run, evaluate and inspect ONNX CNNs with tabconv's interpreter"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a model on one input tensor and write its output.
    ///
    /// Example: tabconv run fixtures/models/lenet5.onnx --input x.npy --output y.npy
    Run {
        /// Model file: .onnx or a compiled .tcv
        model: PathBuf,
        /// Input tensor, float32 NCHW .npy (any batch size; a model with a fixed batch runs it
        /// in chunks of that size)
        #[arg(long)]
        input: PathBuf,
        /// Where to write the (first) output, .npy; further outputs go to <stem>.<i>.npy
        #[arg(long)]
        output: PathBuf,
    },
    /// Top-1 accuracy and throughput on a labelled set.
    ///
    /// Example: tabconv eval fixtures/models/lenet5.onnx lenet5.tcv --inputs fixtures/data/mnist_test.npy
    ///          --labels fixtures/data/mnist_test_labels.npy
    ///
    /// Several models are evaluated on the same images, each on its own line, the later ones with
    /// their accuracy difference from the first (e.g. a compiled model beside its original).
    Eval {
        /// Model files: .onnx or compiled .tcv
        #[arg(required = true, num_args = 1..)]
        models: Vec<PathBuf>,
        /// Images: float32 NCHW .npy, IDX (optionally .gz, e.g. Fashion-MNIST) or CIFAR .bin
        #[arg(long)]
        inputs: PathBuf,
        /// Class labels, one per image: integer .npy, IDX labels or the CIFAR .bin itself
        #[arg(long)]
        labels: PathBuf,
        /// Images per forward pass
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pre: PreArgs,
    },
    /// Print the IR, the op histogram, parameters and MACs per node.
    ///
    /// Example: tabconv inspect fixtures/models/resnet18_fmnist.onnx
    Inspect {
        /// Model file: .onnx or a compiled .tcv
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Median latency per batch and images/s; for a .onnx also tract and ONNX Runtime on the same
    /// model and input in the same run (ONNX Runtime through `python3` with the `onnxruntime`
    /// wheel; tract when built with `--features tract`; an engine that fails or was not built is
    /// reported with its reason and the others still run).
    ///
    /// Example: tabconv bench fixtures/models/resnet18_fmnist.onnx resnet18.tcv --batch 32
    Bench {
        /// Models to time (.onnx and/or .tcv); ratios are given against the first
        #[arg(required = true)]
        models: Vec<PathBuf>,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Worker threads for tabconv (default: all cores)
        #[arg(long)]
        threads: Option<usize>,
        /// Seconds of timing per model and engine (at least 5 runs; the engines take turns, 8 slices each)
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Skip the tract comparison
        #[arg(long)]
        no_tract: bool,
        /// Skip the ONNX Runtime comparison
        #[arg(long)]
        no_ort: bool,
        /// Also print where tabconv's time goes, per op type and node (profiled for about --seconds more, 5 to 1000 runs)
        #[arg(long)]
        profile: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Blocks of 4 KiB or more on 64-byte boundaries (see `tabconv::alloc`).
#[global_allocator]
static ALLOC: tabconv::alloc::CacheAligned = tabconv::alloc::CacheAligned;

fn main() -> ExitCode {
    tabconv::cli::restore_sigpipe();
    tabconv::cli::keep_freed_memory();
    tabconv::output::remove_temp_files_on_signal();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Run { model, input, output } => run(&model, &input, &output),
        Cmd::Eval {
            models,
            inputs,
            labels,
            batch,
            json,
            pre,
        } => pre
            .get()
            .and_then(|pre| eval(&models, &inputs, &labels, batch, json, pre)),
        Cmd::Inspect { model, json } => inspect(&model, json),
        Cmd::Bench {
            models,
            batch,
            threads,
            seconds,
            no_tract,
            no_ort,
            profile,
            json,
        } => bench(&models, batch, threads, seconds, [!no_tract, !no_ort], profile, json),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Load a model to run it (see [`model::load_for_run`]) and print the note about a declared
/// fixed batch, if any.
fn load_noted(model_path: &Path) -> Result<Graph> {
    let graph = model::load_for_run(model_path)?;
    if let Some(note) = model::batch_note(&graph, model_path) {
        eprintln!("{note}");
    }
    Ok(graph)
}

/// [`load_noted`], scheduled to run.
fn load_runner(model_path: &Path) -> Result<Runner> {
    let runner = Runner::load(model_path)?;
    if let Some(note) = runner.batch_note() {
        eprintln!("{note}");
    }
    Ok(runner)
}

fn run(model_path: &Path, input: &Path, output: &Path) -> Result<()> {
    let runner = load_runner(model_path)?;
    let x = data::read_f32(input)?;
    let outs = runner.run(vec![Tensor::F32(x)])?;
    for (i, t) in outs.iter().enumerate() {
        let path = if i == 0 {
            output.to_path_buf()
        } else {
            output.with_extension(format!("{i}.npy"))
        };
        data::write_npy(&path, t)?;
    }
    Ok(())
}

/// Evaluate each model on the same labelled images (one line, or one JSON object, per model).
fn eval(models: &[PathBuf], inputs: &Path, labels: &Path, batch: usize, json: bool, pre: Preprocess) -> Result<()> {
    model::check_batch(batch)?;
    // every model loads (and is checked) before the images are read and anything runs
    let runners = models.iter().map(|m| load_runner(m)).collect::<Result<Vec<_>>>()?;
    let data = Labelled::load(Source::File(inputs.into()), Source::File(labels.into()), pre)?;
    let mut first: Option<f64> = None;
    for (model_path, runner) in models.iter().zip(&runners) {
        let bar = tabconv::cli::progress(data.labels().len().div_ceil(batch), "eval");
        let e = runner.evaluate(&data, batch, || bar.inc(1))?;
        bar.finish_and_clear();
        if json {
            println!("{}", serde_json::to_value(&e).expect("json"));
            continue;
        }
        let vs = match first {
            Some(a) => format!(", {:+.2} points vs the first", (e.accuracy - a) * 100.0),
            None => String::new(),
        };
        first.get_or_insert(e.accuracy);
        println!(
            "{}: accuracy {:.2}% ({}/{}){vs}, {:.1} images/s (batch {batch}, {:.2} s)",
            model_path.display(),
            e.accuracy * 100.0,
            e.correct,
            e.samples,
            e.images_per_second,
            e.seconds
        );
    }
    Ok(())
}

fn inspect(model_path: &Path, json: bool) -> Result<()> {
    let graph: Graph = model::load(model_path)?;
    if let Some(note) = model::batch_note(&graph, model_path) {
        eprintln!("{note}");
    }
    let order = graph.topo_order()?;
    let mut hist = std::collections::BTreeMap::<&str, usize>::new();
    let mut per_node = Vec::new();
    let mut total = cost::Cost::default();
    for &n in &order {
        let node = graph.node(n);
        if matches!(node.op, Op::Input | Op::Const(_)) {
            continue;
        }
        *hist.entry(node.op.name()).or_default() += 1;
        let c = cost::node_cost(&graph, n);
        total.add(&c);
        if c != cost::Cost::default() {
            per_node.push((node.name.clone(), node.op.name(), c));
        }
    }
    // A compiled model records the exact cost of its source; an ONNX model is its own source; a
    // .tcv without that metadata has an unknown source cost (no reduction can be computed).
    let is_onnx = model_path.extension().is_some_and(|e| e == "onnx");
    let source = match graph.metadata.get("source_exact_macs").and_then(|v| v.parse().ok()) {
        Some(macs) => Some(cost::Cost {
            exact_macs: macs,
            ..Default::default()
        }),
        None if is_onnx => Some(cost::Cost {
            exact_macs: total.exact_macs + total.lookups,
            ..Default::default()
        }),
        None => None,
    };
    let reductions = source.as_ref().map(|s| cost::reduction(s, &total));
    let params = cost::param_count(&graph);
    if json {
        let v = serde_json::json!({
            "model": model_path,
            "ir": dump(&graph)?,
            "op_histogram": hist,
            "parameters": params,
            "macs_per_image": total.exact_macs,
            "total": total,
            "source_exact_macs": source.as_ref().map(|s| s.exact_macs),
            "ops_all": total.ops_all(),
            "ops_lookups_only": total.ops_lookups_only(),
            "reduction_lookups_only": reductions.map(|r| r.0),
            "reduction_everything_counted": reductions.map(|r| r.1),
            "per_node": per_node.iter().map(|(n, o, c)| serde_json::json!({"node": n, "op": o, "cost": c})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    print!("{}", dump(&graph)?);
    println!("\nop histogram:");
    for (op, c) in &hist {
        println!("  {op:<20} {c}");
    }
    println!("\ncost per image (batch 1):");
    println!(
        "  {:<44} {:<10} {:>12} {:>11} {:>10} {:>11} {:>10} {:>10}",
        "node", "op", "exact MACs", "enc MACs", "enc cmp", "lookups", "table B", "proto B"
    );
    let row = |name: &str, op: &str, c: &cost::Cost| {
        println!(
            "  {:<44} {:<10} {:>12} {:>11} {:>10} {:>11} {:>10} {:>10}",
            name, op, c.exact_macs, c.encode_macs, c.encode_compares, c.lookups, c.table_bytes, c.prototype_bytes
        )
    };
    for (name, op, c) in &per_node {
        row(name, op, c);
    }
    row("total", "", &total);
    let source_text = match &source {
        Some(s) => format!("exact source: {} MACs = {} ops", s.exact_macs, s.ops_all()),
        None => "exact source: unknown, the .tcv records no source cost".into(),
    };
    println!(
        "\narithmetic ops: {} everything counted, {} lookups only ({source_text})",
        total.ops_all(),
        total.ops_lookups_only(),
    );
    match reductions {
        Some((lookups, all)) => println!(
            "reduction: {:.1}% lookups only (paper convention), {:.1}% everything counted",
            lookups * 100.0,
            all * 100.0
        ),
        None => println!("reduction: unknown (the source model's cost is not recorded in this .tcv)"),
    }
    println!("parameters (f32): {params}");
    Ok(())
}

/// The most worker threads `bench --threads` accepts.
const MAX_THREADS: usize = 1024;

/// The longest `bench --seconds` accepted (a day).
const MAX_BENCH_SECONDS: f64 = 86_400.0;

fn bench(
    models: &[PathBuf],
    batch: usize,
    threads: Option<usize>,
    seconds: f64,
    [tract, ort]: [bool; 2],
    profile: bool,
    json: bool,
) -> Result<()> {
    use tabconv::bench::{interleave, time_ort, time_ours, time_tract, Timing};
    if threads.is_some_and(|t| t > MAX_THREADS) {
        return Err(Error::Input(format!(
            "--threads {}: at most {MAX_THREADS}",
            threads.unwrap_or_default()
        )));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build()
        .map_err(|e| Error::Other(format!("thread pool: {e}")))?;
    let nthreads = pool.current_num_threads();
    model::check_batch(batch)?;
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= MAX_BENCH_SECONDS) {
        return Err(Error::Input(format!(
            "--seconds {seconds}: must be a number of seconds above 0 and at most {MAX_BENCH_SECONDS}"
        )));
    }
    let budget = std::time::Duration::from_secs_f64(seconds.max(0.1));
    let graphs = models.iter().map(|m| load_noted(m)).collect::<Result<Vec<_>>>()?;
    // Every engine on every model, timed in turns (`interleave`); an engine that cannot start
    // is a failed row in its place.
    let mut timers = Vec::new();
    let mut failed: Vec<(usize, Timing)> = Vec::new();
    for (m, graph) in models.iter().zip(&graphs) {
        timers.push(time_ours(graph, m, batch, &pool)?);
        let mut add = |name: &str, timer: Result<_>| match timer {
            Ok(t) => timers.push(t),
            Err(e) => failed.push((
                timers.len() + failed.len(),
                Timing::failed(name, m, batch, e.to_string()),
            )),
        };
        if m.extension().is_some_and(|e| e == "onnx") {
            if tract {
                add("tract", time_tract(graph, m, batch));
            }
            if ort {
                add("ort", time_ort(graph, m, batch, nthreads));
            }
        }
    }
    let mut rows: Vec<Timing> = interleave(timers, budget, 5);
    for (at, row) in failed {
        rows.insert(at, row);
    }
    let base = rows[0].median_ms;
    // ONNX Runtime on the first .onnx model: the engine users already run.
    // ONNX Runtime on the same .onnx model when it ran, else on the first .onnx model (the
    // original, when the others are its compiled forms).
    let ort_of = |model: &str| {
        let ok = |r: &&Timing| r.engine.starts_with("ort") && r.error.is_none();
        rows.iter()
            .filter(ok)
            .find(|r| r.model == model)
            .or_else(|| rows.iter().find(ok))
            .map(|r| r.median_ms)
    };
    let ratio = |num: f64, r: &Timing| (r.error.is_none() && r.median_ms > 0.0).then(|| num / r.median_ms);
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).expect("json");
                v["threads"] = serde_json::json!(nthreads);
                v["simd"] = serde_json::json!(tabconv::interp::kernels::Simd::detect().name());
                v["speedup_vs_first"] = serde_json::json!(ratio(base, r));
                v["speedup_vs_ort"] = serde_json::json!(ort_of(&r.model).and_then(|o| ratio(o, r)));
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    println!(
        "batch {batch}, {nthreads} thread(s) (tabconv and ONNX Runtime; tract runs on one), SIMD: {}; \
         median of ≥5 runs, the engines timed in turns; speedup = other's median / this row's",
        tabconv::interp::kernels::Simd::detect().name()
    );
    println!(
        "  {:<44} {:<12} {:>6} {:>11} {:>11} {:>12} {:>9} {:>8}",
        "model", "engine", "runs", "median ms", "min ms", "images/s", "vs first", "vs ORT"
    );
    let fmt_ratio = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:.2}x"));
    for r in &rows {
        if let Some(e) = &r.error {
            println!("  {:<44} {:<12} failed: {e}", r.model, r.engine);
            continue;
        }
        println!(
            "  {:<44} {:<12} {:>6} {:>11.3} {:>11.3} {:>12.1} {:>9} {:>8}",
            r.model,
            r.engine,
            r.runs,
            r.median_ms,
            r.min_ms,
            r.images_per_second,
            fmt_ratio(ratio(base, r)),
            fmt_ratio(ort_of(&r.model).and_then(|o| ratio(o, r)))
        );
        if let Some(b) = r.chunk {
            println!(
                "  {:<44} {:<12} ran {batch} images as {}×{b} chunks (the file fixes the batch at {b})",
                "",
                "",
                batch.div_ceil(b)
            );
        }
        if let Some(s) = r.sub_batch {
            println!(
                "  {:<44} {:<12} ran {batch} images as sub-batches of {s} (activations kept in cache; one per thread)",
                "", ""
            );
        }
    }
    if profile {
        for m in models {
            let graph = model::load_for_run(m)?;
            let ((p, nodes), runs) = pool.install(|| tabconv::bench::profile_for(&graph, batch, 1000, seconds))?;
            let total: f64 = p.iter().map(|(_, s, _)| s).sum();
            println!(
                "\nprofile of {} ({runs} runs in about --seconds, batch {batch}):",
                m.display()
            );
            let per = runs as f64;
            for (op, s, n) in p {
                println!(
                    "  {op:<20} {:>9.3} ms/run {:>6.1}% {:>6} calls",
                    s * 1e3 / per,
                    100.0 * s / total,
                    n / runs
                );
            }
            println!("  slowest nodes:");
            for (name, op, s, _) in nodes.iter().take(60) {
                println!(
                    "    {:<56} {op:<12} {:>9.4} ms/run {:>6.1}%",
                    name,
                    s * 1e3 / per,
                    100.0 * s / total
                );
            }
        }
    }
    Ok(())
}
