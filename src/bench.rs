//! `tabconv bench`: median latency per batch of our interpreter and, for ONNX models, of tract (in
//! process; built with the `tract` feature) and ONNX Runtime (`python3` with the `onnxruntime`
//! wheel, as a child process timed by the same loop) in the same run on the same input, the
//! engines taking turns ([`interleave`]), so ratios compare like with like. An engine that fails,
//! or was not built, is reported with its reason; the others still run.

use crate::error::{Error, Result};
use crate::interp::Plan;
use crate::ir::{Dim, Graph, Tensor};
use crate::pq::rng::Rng;
use ndarray::{ArrayD, IxDyn};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub engine: String,
    pub model: String,
    pub batch: usize,
    pub runs: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub images_per_second: f64,
    /// The fixed batch the engine ran the `batch` images in chunks of, when the model declares
    /// one that differs from `batch` (each timed run covers all `batch` images).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk: Option<usize>,
    /// The sub-batch tabconv ran the `batch` images in ([`crate::interp::split`]), when smaller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_batch: Option<usize>,
    /// Why this engine could not be timed (then the numbers are 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Timing {
    /// A row for an engine that failed.
    pub fn failed(engine: &str, model: &Path, batch: usize, why: String) -> Timing {
        Timing {
            error: Some(why),
            ..row(engine, model, batch)
        }
    }
}

/// A deterministic input batch of the model's declared input shape with `batch` images (values in
/// [0, 1)). A model with a fixed batch (see [`crate::interp::fixed_batch`]) gets `batch` images
/// too: the interpreter runs them in chunks.
pub fn synthetic_input(graph: &Graph, batch: usize) -> Result<ArrayD<f32>> {
    let fixed = crate::interp::fixed_batch(graph).is_some();
    let n = graph
        .inputs
        .first()
        .ok_or_else(|| Error::Other("model has no input".into()))?;
    let f = graph.node(*n).outputs[0]
        .fact
        .as_ref()
        .ok_or_else(|| Error::Other("input has no shape".into()))?;
    let shape: Vec<usize> = f
        .shape
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Known(_) if i == 0 && fixed => batch,
            Dim::Known(v) => *v as usize,
            Dim::Batch(k) => (*k as usize).saturating_mul(batch),
        })
        .collect();
    let mut rng = Rng::new(42);
    let len = crate::limits::check_shape(&shape, 4, &format!("a batch of {batch}"))?;
    Ok(ArrayD::from_shape_vec(IxDyn(&shape), (0..len).map(|_| rng.next_f64() as f32).collect()).expect("size"))
}

/// Most timed runs of one engine and model (the times of 10⁵ runs take 0.8 MB).
const MAX_RUNS: usize = 100_000;

/// Slices each engine's budget is cut into, the engines taking turns: a slow phase of a shared
/// machine (seconds to minutes) then slows every engine of the run alike instead of the one
/// being timed.
const ROUNDS: usize = 8;

/// Runs of `f` for about `budget` of wall time (at least `min_runs`, at most `max_runs`): their
/// times in milliseconds.
fn time_runs(
    mut f: impl FnMut() -> Result<()>,
    budget: Duration,
    min_runs: usize,
    max_runs: usize,
) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_runs || (start.elapsed() < budget && times.len() < max_runs) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

/// Times `(budget, min_runs, max_runs)` → the milliseconds of runs, as [`time_runs`].
type Slice<'a> = Box<dyn FnMut(Duration, usize, usize) -> Result<Vec<f64>> + 'a>;

/// One engine on one model, ready to be timed slice by slice ([`interleave`]).
pub struct Timer<'a> {
    /// The row, its numbers filled in by [`interleave`].
    row: Timing,
    slice: Slice<'a>,
}

impl std::fmt::Debug for Timer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer").field("row", &self.row).finish_non_exhaustive()
    }
}

/// Times every timer for about `budget` each (at least `min_runs` runs): a warm-up slice each (a
/// tenth of `budget`, at most 0.3 s: caches, clocks and helper threads settle), then
/// [`ROUNDS`] rounds in which the timers take turns. A timer that fails is reported with its
/// reason and left out of later rounds. Rows in the timers' order.
pub fn interleave(mut timers: Vec<Timer>, budget: Duration, min_runs: usize) -> Vec<Timing> {
    let mut times: Vec<Result<Vec<f64>>> = timers.iter().map(|_| Ok(Vec::new())).collect();
    let warm = (budget / 10).min(Duration::from_millis(300));
    for (t, times) in timers.iter_mut().zip(&mut times) {
        if let Err(e) = (t.slice)(warm, 2, MAX_RUNS) {
            *times = Err(e);
        }
    }
    for _ in 0..ROUNDS {
        for (t, times) in timers.iter_mut().zip(&mut times) {
            if let Ok(v) = times {
                match (t.slice)(budget / ROUNDS as u32, min_runs.div_ceil(ROUNDS), MAX_RUNS / ROUNDS) {
                    Ok(more) => v.extend(more),
                    Err(e) => *times = Err(e),
                }
            }
        }
    }
    timers
        .into_iter()
        .zip(times)
        .map(|(t, times)| match times {
            Ok(mut v) => {
                v.sort_by(f64::total_cmp);
                let (median, min) = (v[v.len() / 2], v[0]);
                Timing {
                    runs: v.len(),
                    median_ms: median,
                    min_ms: min,
                    images_per_second: t.row.batch as f64 / (median / 1e3),
                    ..t.row
                }
            }
            Err(e) => Timing {
                error: Some(e.to_string()),
                ..t.row
            },
        })
        .collect()
}

/// A row for `engine` on `model`, its numbers not yet measured.
fn row(engine: &str, model: &Path, batch: usize) -> Timing {
    Timing {
        engine: engine.into(),
        model: model.display().to_string(),
        batch,
        runs: 0,
        median_ms: 0.0,
        min_ms: 0.0,
        images_per_second: 0.0,
        chunk: None,
        sub_batch: None,
        error: None,
    }
}

/// Our interpreter on `graph`, its runs on `pool`.
pub fn time_ours<'a>(graph: &'a Graph, model: &Path, batch: usize, pool: &'a rayon::ThreadPool) -> Result<Timer<'a>> {
    let x = synthetic_input(graph, batch)?;
    let plan = Plan::new(graph)?;
    let mut r = row("tabconv", model, batch);
    r.chunk = plan.fixed_batch().filter(|&b| b != batch);
    r.sub_batch = plan.sub_batch(batch).filter(|_| r.chunk.is_none());
    let slice = move |budget, min_runs, max_runs| {
        pool.install(|| {
            let run = || plan.run(vec![Tensor::F32(x.clone())]).map(|_| ());
            time_runs(run, budget, min_runs, max_runs)
        })
    };
    Ok(Timer {
        row: r,
        slice: Box::new(slice),
    })
}

/// Where our interpreter's time goes over `runs` runs: seconds per op type, and per node.
pub type ProfileResult = (Vec<(&'static str, f64, usize)>, Vec<(String, &'static str, f64, usize)>);

/// Seconds per op type and per node over `runs` runs of our interpreter.
pub fn profile_ours(graph: &Graph, batch: usize, runs: usize) -> Result<ProfileResult> {
    profile_runs(graph, batch, |_| runs).map(|(p, _)| p)
}

/// [`profile_ours`] over as many runs as fit in `seconds` (as long as the second of two
/// untimed runs took), between 5 and `max_runs`; returns the runs made too (a noisy host
/// averages out over more of them).
pub fn profile_for(graph: &Graph, batch: usize, max_runs: usize, seconds: f64) -> Result<(ProfileResult, usize)> {
    profile_runs(graph, batch, |one| {
        ((seconds / one.max(1e-6)) as usize).clamp(5, max_runs.max(5))
    })
}

/// The profile over `runs(seconds one run took)` runs, after two untimed ones; and that count.
fn profile_runs(graph: &Graph, batch: usize, runs: impl FnOnce(f64) -> usize) -> Result<(ProfileResult, usize)> {
    let x = synthetic_input(graph, batch)?;
    let mut plan = Plan::new(graph)?;
    plan.run(vec![Tensor::F32(x.clone())])?;
    let t = Instant::now();
    plan.run(vec![Tensor::F32(x.clone())])?;
    let runs = runs(t.elapsed().as_secs_f64());
    plan.enable_profile();
    for _ in 0..runs {
        plan.run(vec![Tensor::F32(x.clone())])?;
    }
    Ok(((plan.profile(), plan.profile_nodes()), runs))
}

/// Why there is no tract column in a build without the `tract` feature.
pub const TRACT_NOT_BUILT: &str = "not built (rebuild with --features tract)";

/// tract (optimized plan for this batch size) on the same ONNX file and input.
#[cfg(feature = "tract")]
pub fn time_tract<'a>(graph: &Graph, model: &Path, batch: usize) -> Result<Timer<'a>> {
    use tract_onnx::prelude::*;
    // The ONNX file may declare a fixed batch even when our import made it symbolic: tract runs
    // the file as declared, `batch` images in chunks of that size.
    let chunk = crate::model::declared_batch(graph).filter(|&b| b != batch);
    let x = synthetic_input(graph, chunk.unwrap_or(batch))?;
    let runs = chunk.map_or(1, |b| batch.div_ceil(b));
    let terr = |e: TractError| Error::Other(format!("tract: {e}"));
    let plan = tract_onnx::onnx()
        .model_for_path(model)
        .map_err(terr)?
        .with_input_fact(0, f32::fact(x.shape()).into())
        .map_err(terr)?
        .into_optimized()
        .map_err(terr)?
        .into_runnable()
        .map_err(terr)?;
    let data: Vec<f32> = x.iter().copied().collect();
    let input: TValue = tract_onnx::prelude::Tensor::from_shape(x.shape(), &data)
        .map_err(terr)?
        .into();
    let run = move || -> Result<()> {
        for _ in 0..runs {
            plan.run(tvec!(input.clone())).map_err(terr)?;
        }
        Ok(())
    };
    let mut r = row("tract", model, batch);
    r.chunk = chunk;
    Ok(Timer {
        row: r,
        slice: Box::new(move |budget, min_runs, max_runs| time_runs(&run, budget, min_runs, max_runs)),
    })
}

/// tract is an optional dependency (the `tract` feature): without it this is the error
/// [`TRACT_NOT_BUILT`], reported like any engine that fails.
#[cfg(not(feature = "tract"))]
pub fn time_tract<'a>(_: &Graph, _: &Path, _: usize) -> Result<Timer<'a>> {
    Err(Error::Other(TRACT_NOT_BUILT.into()))
}

/// The ONNX Runtime timing script (run by `python3`; see [`time_ort`]).
const ORT_SCRIPT: &str = include_str!("bench_ort.py");

/// ONNX Runtime on the same ONNX file and the same input: `python3` runs [`ORT_SCRIPT`], which
/// loads an `InferenceSession` with `threads` intra-op threads, then times `run` for each slice
/// it is asked for on its standard input with the same loop as [`time_runs`]. Fails (with the
/// reason) when python3 or onnxruntime is missing or ORT rejects the model.
pub fn time_ort<'a>(graph: &Graph, model: &Path, batch: usize, threads: usize) -> Result<Timer<'a>> {
    use std::process::{Command, Stdio};
    let x = synthetic_input(graph, batch)?;
    let dir = tempfile::tempdir().map_err(|e| Error::Other(format!("temp dir: {e}")))?;
    let input = dir.path().join("input.npy");
    crate::data::write_npy(&input, &Tensor::F32(x))?;
    let script = dir.path().join("bench_ort.py");
    std::fs::write(&script, ORT_SCRIPT).map_err(|e| Error::io(&script, e))?;
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(model)
        .arg(&input)
        .arg(threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Other(format!("onnxruntime: cannot start python3: {e}")))?;
    let mut ort = Ort {
        stdin: child.stdin.take(),
        stdout: std::io::BufReader::new(child.stdout.take().expect("piped")),
        child,
        _dir: dir,
    };
    let ready = ort.reply()?;
    let engine = match ready.get("version").and_then(|x| x.as_str()) {
        Some(ver) => format!("ort {ver}"),
        None => "ort".into(),
    };
    let mut r = row(&engine, model, batch);
    r.chunk = ready.get("chunk").and_then(|c| c.as_u64()).map(|c| c as usize);
    Ok(Timer {
        row: r,
        slice: Box::new(move |budget, min_runs, max_runs| ort.time(budget, min_runs, max_runs)),
    })
}

/// The ONNX Runtime timing script's process, its input file in `_dir`.
struct Ort {
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Ort {
    /// The script's next line: one JSON object, first the session's (version and chunk, or the
    /// error), then the times of each slice.
    fn reply(&mut self) -> Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        let read = self.stdout.read_line(&mut line);
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|_| {
            Error::Other(match read {
                Ok(0) => "onnxruntime: the timing script ended without a result".into(),
                Ok(_) => format!("onnxruntime: the timing script printed {:?}", line.trim()),
                Err(e) => format!("onnxruntime: {e}"),
            })
        })?;
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) => Err(Error::Other(e.to_string())),
            None => Ok(v),
        }
    }

    /// One slice: the script times runs as [`time_runs`] does.
    fn time(&mut self, budget: Duration, min_runs: usize, max_runs: usize) -> Result<Vec<f64>> {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("open until dropped");
        writeln!(stdin, "{} {min_runs} {max_runs}", budget.as_secs_f64())
            .and_then(|_| stdin.flush())
            .map_err(|e| Error::Other(format!("onnxruntime: the timing script stopped: {e}")))?;
        let v = self.reply()?;
        let times = v.get("times").and_then(|t| t.as_array());
        let times = times.ok_or_else(|| Error::Other("onnxruntime: the timing script printed no times".into()))?;
        Ok(times.iter().filter_map(|t| t.as_f64()).collect())
    }
}

impl Drop for Ort {
    /// Closing its input ends the script (it reads to the end); then it is waited for.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A timer that logs its slices as `(name, min_runs)` and fails from slice `fail_at` on.
    fn fake<'a>(name: &'static str, log: &'a RefCell<Vec<&'static str>>, fail_at: usize) -> Timer<'a> {
        let mut n = 0;
        Timer {
            row: row(name, Path::new("m.onnx"), 4),
            slice: Box::new(move |_, min_runs, _| {
                n += 1;
                log.borrow_mut().push(name);
                if n > fail_at {
                    return Err(Error::Other(format!("{name} broke")));
                }
                Ok((0..min_runs).map(|i| (n * 10 + i) as f64).collect())
            }),
        }
    }

    /// The engines take turns (a warm-up slice each, then `ROUNDS` rounds); the warm-up's times
    /// are not kept; an engine that fails is a row with its reason, the others go on.
    #[test]
    fn engines_are_timed_in_turns() {
        let log = RefCell::new(Vec::new());
        let timers = vec![
            fake("a", &log, usize::MAX),
            fake("b", &log, 3),
            fake("c", &log, usize::MAX),
        ];
        let rows = interleave(timers, Duration::from_millis(1), 2 * ROUNDS);
        let log = log.into_inner();
        // warm-up a b c, then rounds: b fails in its third round (its fourth slice) and leaves
        let mut want = vec!["a", "b", "c"];
        for r in 0..ROUNDS {
            want.extend(if r < 3 {
                ["a", "b", "c"].as_slice()
            } else {
                ["a", "c"].as_slice()
            });
        }
        assert_eq!(log, want);
        assert_eq!(
            rows.iter().map(|r| r.engine.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(rows[1].error.as_deref(), Some("b broke"));
        for r in [&rows[0], &rows[2]] {
            assert!(r.error.is_none());
            // two runs per round, none from the warm-up (slice 1, times 10, 11)
            assert_eq!(r.runs, 2 * ROUNDS);
            assert_eq!(r.min_ms, 20.0);
            assert_eq!(r.images_per_second, 4.0 / (r.median_ms / 1e3));
        }
    }
}
