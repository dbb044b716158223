//! The binary: `--device` semantics seen from the command line.

use std::process::Command;

use qlora_rs::device::Availability;

use crate::common::qlora;

#[test]
fn cli_env_on_cpu_says_which_device_and_why() {
    let out = qlora(&["env", "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("device: cpu (asked for)"), "{stdout}");
    assert!(stdout.contains("kernels:"), "{stdout}");
}

#[test]
fn cli_auto_reports_its_choice() {
    let out = qlora(&["env"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let expected = match Availability::probe().cuda_unavailable_reason(0) {
        Some(why) => format!("device: cpu (auto: {why})"),
        None => "device: cuda:0 (auto".to_string(),
    };
    assert!(
        stdout.contains(&expected),
        "{stdout} should contain {expected}"
    );
}

#[test]
fn cli_cuda_without_gpu_is_one_line_and_nonzero_exit() {
    let avail = Availability::probe();
    let out = qlora(&["env", "--device", "cuda"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match avail.cuda_unavailable_reason(0) {
        Some(why) => {
            assert!(!out.status.success());
            assert_eq!(stderr.trim(), format!("error: --device cuda:0: {why}"));
            assert!(!stderr.contains("panicked"));
        }
        None => assert!(out.status.success(), "{stderr}"),
    }
}

#[test]
fn cli_env_self_test_on_gpu_with_sync_after_every_launch() {
    let Some(_) =
        qlora_rs::testing::gpu_or_skip("cli_env_self_test_on_gpu_with_sync_after_every_launch")
    else {
        return;
    };
    let out = Command::new(crate::common::qlora_bin())
        .args(["env", "--device", "cuda"])
        .env("QLORA_SYNC", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("device: cuda:0 (asked for)"), "{stdout}");
    assert!(
        stdout.contains("self-test: NF4 quantize + dequantize on cuda:0 match"),
        "{stdout}"
    );
}

#[test]
fn cli_rejects_unknown_device() {
    let out = qlora(&["env", "--device", "tpu"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown device `tpu`"), "{stderr}");
}
