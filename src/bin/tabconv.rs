//! `tabconv`: run, evaluate and inspect `.onnx` models with tabconv's own interpreter.

use clap::{Parser, Subcommand};
use ndarray::Axis;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use tabconv::interp::Plan;
use tabconv::ir::{cost, dump::dump, Graph, Op, Tensor};
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
        /// Model file (.onnx)
        model: PathBuf,
        /// Input tensor, float32 NCHW .npy (any batch size)
        #[arg(long)]
        input: PathBuf,
        /// Where to write the (first) output, .npy; further outputs go to <stem>.<i>.npy
        #[arg(long)]
        output: PathBuf,
    },
    /// Top-1 accuracy and throughput on a labelled set.
    ///
    /// Example: tabconv eval fixtures/models/lenet5.onnx --inputs fixtures/data/mnist_test.npy
    ///          --labels fixtures/data/mnist_test_labels.npy
    Eval {
        model: PathBuf,
        /// Images, float32 NCHW .npy
        #[arg(long)]
        inputs: PathBuf,
        /// Integer class labels .npy, one per image
        #[arg(long)]
        labels: PathBuf,
        /// Images per forward pass
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Print the IR, the op histogram, parameters and MACs per node.
    ///
    /// Example: tabconv inspect fixtures/models/resnet18_fmnist.onnx
    Inspect {
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tabconv::cli::restore_sigpipe();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Run { model, input, output } => run(&model, &input, &output),
        Cmd::Eval {
            model,
            inputs,
            labels,
            batch,
            json,
        } => eval(&model, &inputs, &labels, batch, json),
        Cmd::Inspect { model, json } => inspect(&model, json),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(model_path: &Path, input: &Path, output: &Path) -> Result<()> {
    let graph = model::load(model_path)?;
    let x = data::read_f32(input)?;
    let outs = Plan::new(&graph)?.run(vec![Tensor::F32(x)])?;
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

fn eval(model_path: &Path, inputs: &Path, labels: &Path, batch: usize, json: bool) -> Result<()> {
    let graph = model::load(model_path)?;
    let x = data::read_f32(inputs)?;
    let y = data::read_labels(labels)?;
    let n = x.shape().first().copied().unwrap_or(0);
    if n == 0 || n != y.len() {
        return Err(Error::Input(format!(
            "{} holds {n} images but {} holds {} labels",
            inputs.display(),
            labels.display(),
            y.len()
        )));
    }
    let plan = Plan::new(&graph)?;
    let batch = batch.max(1);
    let start = Instant::now();
    let mut correct = 0usize;
    for (i, chunk) in x.axis_chunks_iter(Axis(0), batch).enumerate() {
        let out = plan.run(vec![Tensor::F32(chunk.to_owned())])?;
        let pred = model::argmax_rows(out[0].as_f32()?);
        correct += pred.iter().zip(&y[i * batch..]).filter(|(p, l)| p == l).count();
    }
    let secs = start.elapsed().as_secs_f64();
    let acc = correct as f64 / n as f64;
    if json {
        println!(
            "{}",
            serde_json::json!({"model": model_path, "accuracy": acc, "correct": correct, "samples": n,
                "batch": batch, "seconds": secs, "images_per_second": n as f64 / secs})
        );
    } else {
        println!(
            "{}: accuracy {:.2}% ({correct}/{n}), {:.1} images/s (batch {batch}, {:.2} s)",
            model_path.display(),
            acc * 100.0,
            n as f64 / secs,
            secs
        );
    }
    Ok(())
}

fn inspect(model_path: &Path, json: bool) -> Result<()> {
    let graph: Graph = model::load(model_path)?;
    let order = graph.topo_order()?;
    let mut hist = std::collections::BTreeMap::<&str, usize>::new();
    let mut per_node = Vec::new();
    let mut total = 0u64;
    for &n in &order {
        let node = graph.node(n);
        if matches!(node.op, Op::Input | Op::Const(_)) {
            continue;
        }
        *hist.entry(node.op.name()).or_default() += 1;
        let macs = cost::node_macs(&graph, n);
        total += macs;
        if macs > 0 {
            per_node.push((node.name.clone(), node.op.name(), macs));
        }
    }
    let params = cost::param_count(&graph);
    if json {
        let v = serde_json::json!({
            "model": model_path,
            "ir": dump(&graph)?,
            "op_histogram": hist,
            "parameters": params,
            "macs_per_image": total,
            "macs_per_node": per_node.iter().map(|(n, o, m)| serde_json::json!({"node": n, "op": o, "macs": m})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    print!("{}", dump(&graph)?);
    println!("\nop histogram:");
    for (op, c) in &hist {
        println!("  {op:<20} {c}");
    }
    println!("\nMACs per image (batch 1):");
    for (name, op, m) in &per_node {
        println!("  {name:<40} {op:<10} {m:>14}");
    }
    println!("  {:<40} {:<10} {total:>14}", "total", "");
    println!("\nparameters: {params}");
    Ok(())
}
