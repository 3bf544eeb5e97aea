//! Per-op cases (fixtures/ops, built by fixtures/ops.py): our interpreter against the stored
//! ONNX Runtime outputs, and against tract run in-process on the same model.

mod common;
use common::*;

const TOL: f32 = 1e-4;

/// Cases whose op or mode tabconv deliberately does not support: they must fail with a clear
/// error naming the op, never a panic or a wrong number.
const EXPECTED_UNSUPPORTED: &[(&str, &str)] = &[
    ("pad_opset13_reflect", "reflect"),
    ("pad_opset13_edge", "edge"),
    ("dropout_opset12_mask", "Dropout mask"),
];

#[test]
fn ops_match_onnx_runtime() {
    let m = manifest("ops/manifest.json");
    assert!(m.cases.len() > 100, "manifest lost cases");
    let mut failures = Vec::new();
    for case in &m.cases {
        let inputs: Vec<_> = case.inputs.iter().map(|p| npy(p)).collect();
        let res = run_ours(&fixture(&case.model), &inputs);
        if let Some((_, needle)) = EXPECTED_UNSUPPORTED.iter().find(|(n, _)| *n == case.name) {
            match res {
                Err(e) if e.to_string().contains(needle) => continue,
                other => {
                    failures.push(format!(
                        "{}: expected a clear '{needle}' error, got {:?}",
                        case.name,
                        other.map(|_| "success")
                    ));
                    continue;
                }
            }
        }
        match res {
            Err(e) => failures.push(format!("{}: {e}", case.name)),
            Ok(outs) => {
                if outs.len() != case.outputs.len() {
                    failures.push(format!(
                        "{}: {} outputs, ONNX Runtime {}",
                        case.name,
                        outs.len(),
                        case.outputs.len()
                    ));
                    continue;
                }
                for (o, want) in outs.iter().zip(&case.outputs) {
                    let want = tabconv::data::read_tensor(&fixture(want)).unwrap();
                    if want.dtype() != o.dtype() {
                        failures.push(format!("{}: dtype {} vs ORT {}", case.name, o.dtype(), want.dtype()));
                        continue;
                    }
                    let (got, want) = (as_f32(o), as_f32(&want));
                    if got.shape() != want.shape() {
                        failures.push(format!(
                            "{}: shape {:?} vs ORT {:?}",
                            case.name,
                            got.shape(),
                            want.shape()
                        ));
                    } else if rel_err(&got, &want) > TOL {
                        failures.push(format!("{}: error {:e} vs ORT", case.name, rel_err(&got, &want)));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn awkward_ops_match_tract() {
    // The awkward geometry cases the foundation issue names, checked against a second engine.
    let names = [
        "conv_pads_asym",
        "conv_stride2_dil2",
        "conv_group2",
        "conv_depthwise",
        "conv_same_upper",
        "conv_same_lower",
        "maxpool_ceil",
        "maxpool_ceil_pads",
        "avgpool_ceil_cip0",
        "avgpool_pads_cip1",
        "add_bcast_c11",
        "add_bidirectional",
        "sum3",
        "gemm_both_trans_cMN",
        "matmul_4d_bcast",
        "lrn",
        "softmax_opset11_axis1_4d",
        "reshape_0_3_m1",
        "transpose_5d_shuffle",
    ];
    let m = manifest("ops/manifest.json");
    let mut checked = 0;
    for name in names {
        let case = m
            .cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("missing case {name}"));
        let inputs: Vec<_> = case.inputs.iter().map(|p| npy(p)).collect();
        let ours = run_ours(&fixture(&case.model), &inputs).unwrap_or_else(|e| panic!("{name}: {e}"));
        let theirs = run_tract(&fixture(&case.model), &inputs);
        assert_eq!(ours.len(), theirs.len(), "{name}: output count vs tract");
        for (o, t) in ours.iter().zip(&theirs) {
            let e = rel_err(&as_f32(o), t);
            assert!(e <= TOL, "{name}: error {e:e} vs tract");
        }
        checked += 1;
    }
    assert_eq!(checked, names.len());
}
