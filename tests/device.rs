//! Devices: `--device` parsing and selection, tensors' host↔device copies, the module cache.

use half::{bf16, f16};
use qlora_rs::device::{self, Availability, CudaDevice, Device, DeviceRequest};
use qlora_rs::testing::gpu_or_skip;
use qlora_rs::{DType, Error, Tensor};
use rand::{Rng, SeedableRng};

fn avail(kernels: bool, driver: bool, gpu_count: usize) -> Availability {
    Availability {
        kernels,
        driver,
        gpu_count,
        driver_error: None,
    }
}

#[test]
fn device_request_parses_auto_cpu_cuda_and_ordinals() {
    assert_eq!(
        "auto".parse::<DeviceRequest>().unwrap(),
        DeviceRequest::Auto
    );
    assert_eq!("CPU".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
    assert_eq!(
        "cuda".parse::<DeviceRequest>().unwrap(),
        DeviceRequest::Cuda(0)
    );
    assert_eq!(
        "cuda:3".parse::<DeviceRequest>().unwrap(),
        DeviceRequest::Cuda(3)
    );
    let err = "tpu".parse::<DeviceRequest>().unwrap_err().to_string();
    assert!(
        err.contains("tpu") && err.contains("auto, cpu, cuda"),
        "{err}"
    );
    assert!("cuda:x".parse::<DeviceRequest>().is_err());
}

#[test]
fn device_auto_picks_cuda_only_with_kernels_driver_and_gpu() {
    let full = avail(true, true, 2);
    assert_eq!(
        device::select(DeviceRequest::Auto, &full).unwrap().device,
        Device::Cuda(0)
    );
    for (a, why) in [
        (avail(false, true, 1), device::NO_KERNELS),
        (avail(true, false, 0), device::NO_DRIVER),
        (avail(true, true, 0), "no GPU"),
    ] {
        let s = device::select(DeviceRequest::Auto, &a).unwrap();
        assert_eq!(s.device, Device::Cpu);
        assert!(s.reason.contains(why), "{} should say {why}", s.reason);
    }
}

#[test]
fn device_explicit_cuda_fails_with_one_clear_line() {
    let cases = [
        (avail(false, false, 0), device::NO_KERNELS),
        (avail(true, false, 0), device::NO_DRIVER),
        (avail(true, true, 0), "no GPU"),
        (avail(true, true, 1), "reports 1 GPU(s)"),
    ];
    for (a, why) in cases {
        let err = device::select(DeviceRequest::Cuda(1), &a).unwrap_err();
        assert!(matches!(err, Error::CudaUnavailable(_)));
        let msg = err.to_string();
        assert!(msg.contains(why), "{msg} should say {why}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    let ok = device::select(DeviceRequest::Cuda(1), &avail(true, true, 2)).unwrap();
    assert_eq!(ok.device, Device::Cuda(1));
    let cpu = device::select(DeviceRequest::Cpu, &avail(true, true, 2)).unwrap();
    assert_eq!(cpu.device, Device::Cpu);
}

#[test]
fn device_probe_on_this_machine_is_consistent() {
    let a = Availability::probe();
    assert_eq!(a.kernels, device::kernels::available());
    if !a.driver {
        assert_eq!(a.gpu_count, 0);
    }
    // Auto never fails, and CudaDevice::get agrees with the probe (an Err, never a panic).
    let s = device::select(DeviceRequest::Auto, &a).unwrap();
    match a.cuda_unavailable_reason(0) {
        Some(why) => {
            assert_eq!(s.device, Device::Cpu);
            let err = CudaDevice::get(0).unwrap_err().to_string();
            assert_eq!(err, why);
        }
        None => assert_eq!(s.device, Device::Cuda(0)),
    }
}

#[test]
fn device_kernels_are_embedded_when_required() {
    // CI and the GPU bundle build with QLORA_REQUIRE_KERNELS=1: then every kernels/*.cu must be in.
    if std::env::var("QLORA_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
        assert!(device::kernels::available());
        let dir = &qlora_rs::testing::project_root().join("kernels");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "cu") {
                let stem = path.file_stem().unwrap().to_str().unwrap();
                let bin = device::kernels::fatbin(stem)
                    .unwrap_or_else(|| panic!("kernels/{stem}.cu missing from the build"));
                assert!(bin.len() > 1000, "{stem}: fatbin of {} bytes", bin.len());
            }
        }
    }
}

#[test]
fn tensor_rejects_wrong_element_count_and_dtype() {
    let err = Tensor::from_vec(vec![1.0f32; 5], &[2, 3], &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("6 elements for shape [2, 3]"),
        "{err}"
    );
    let t = Tensor::from_vec(vec![1.0f32; 6], &[2, 3], &Device::Cpu).unwrap();
    let err = t.to_vec::<bf16>().unwrap_err().to_string();
    assert!(err.contains("f32") && err.contains("bf16"), "{err}");
    let z = Tensor::zeros(&[3, 7], DType::F16, &Device::Cpu).unwrap();
    assert_eq!(z.to_vec::<f16>().unwrap(), vec![f16::ZERO; 21]);
}

fn roundtrip<T: qlora_rs::tensor::Element + PartialEq + std::fmt::Debug>(
    data: Vec<T>,
    dev: &Device,
) {
    let n = data.len();
    let t = Tensor::from_vec(data.clone(), &[n], dev).unwrap();
    assert_eq!(t.device(), *dev);
    let copy = t.to_device(dev).unwrap();
    let back = copy.to_device(&Device::Cpu).unwrap();
    assert_eq!(back.to_vec::<T>().unwrap(), data);
    assert_eq!(t.to_vec::<T>().unwrap(), data);
}

#[test]
fn device_cuda_roundtrip_every_dtype() {
    let Some(dev) = gpu_or_skip("device_cuda_roundtrip_every_dtype") else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for n in [1usize, 7, 97, 8191, 1 << 20] {
        roundtrip((0..n).map(|_| rng.random::<f32>()).collect(), &dev);
        roundtrip((0..n).map(|_| bf16::from_f32(rng.random())).collect(), &dev);
        roundtrip((0..n).map(|_| f16::from_f32(rng.random())).collect(), &dev);
        roundtrip((0..n).map(|_| rng.random::<u8>()).collect(), &dev);
        roundtrip((0..n).map(|_| rng.random::<i32>()).collect(), &dev);
    }
    let z = Tensor::zeros(&[5, 3], DType::BF16, &dev).unwrap();
    assert_eq!(z.to_vec::<bf16>().unwrap(), vec![bf16::ZERO; 15]);
}

#[test]
fn device_cuda_module_cache_loads_each_fatbin_once() {
    let Some(Device::Cuda(o)) = gpu_or_skip("device_cuda_module_cache_loads_each_fatbin_once")
    else {
        return;
    };
    let dev = CudaDevice::get(o).unwrap();
    assert!(std::sync::Arc::ptr_eq(&dev, &CudaDevice::get(o).unwrap()));
    dev.function("nf4", "nf4_quantize_f32").unwrap();
    dev.function("nf4", "nf4_dequantize_bf16").unwrap();
    let err = dev
        .function("nf4", "no_such_kernel")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no_such_kernel"), "{err}");
    let err = dev.function("no_such_file", "k").unwrap_err().to_string();
    assert!(err.contains("no_such_file"), "{err}");
}

/// The device's default memory pool keeps freed blocks (release threshold "never"), so a step's
/// activations are reused from the pool instead of being mapped from the driver every step.
#[test]
fn device_cuda_pool_keeps_freed_memory() {
    use cudarc::driver::{result, sys};
    let Some(Device::Cuda(o)) = gpu_or_skip("device_cuda_pool_keeps_freed_memory") else {
        return;
    };
    let dev = CudaDevice::get(o).unwrap();
    let cu = result::device::get(o as i32).unwrap();
    // SAFETY: cu is a valid device; the attribute is a u64 written through the pointer.
    let threshold = unsafe {
        if result::device::get_attribute(
            cu,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED,
        )
        .unwrap()
            == 0
        {
            eprintln!("SKIPPED: this device has no memory pools");
            return;
        }
        let pool = result::device::get_default_mem_pool(cu).unwrap();
        let mut v = 0u64;
        result::mem_pool::get_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut v as *mut u64).cast(),
        )
        .unwrap();
        v
    };
    assert_eq!(threshold, u64::MAX);
    // Every tensor comes from that pool, so its high-water mark covers a fresh 64 MiB one.
    let t = Tensor::zeros(&[16 << 20], DType::F32, &Device::Cuda(o)).unwrap();
    let (allocated, reserved) = dev.pool_peaks().unwrap().unwrap();
    assert!(
        allocated >= 64 << 20 && reserved >= allocated,
        "{allocated} {reserved}"
    );
    drop(t);
}

/// A launch asking for more dynamic shared memory than its kernel opted into
/// (`cuFuncSetAttribute`) is refused at the launch, as the driver does, and leaves the device
/// usable: a refused launch is not a kernel fault.
#[test]
fn device_cuda_launch_beyond_the_shared_memory_opt_in_is_refused() {
    let Some(Device::Cuda(o)) =
        gpu_or_skip("device_cuda_launch_beyond_the_shared_memory_opt_in_is_refused")
    else {
        return;
    };
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let dev = CudaDevice::get(o).unwrap();
    let f = dev.function("embedding", "cast_f32_bf16").unwrap();
    let x = Tensor::from_vec(vec![1.5f32; 32], &[32], &Device::Cuda(o)).unwrap();
    let y = Tensor::zeros(&[32], DType::BF16, &Device::Cuda(o)).unwrap();
    let n = 32i64;
    let mut b = dev.stream().launch_builder(f);
    b.arg(x.cuda_slice::<f32>("test").unwrap())
        .arg(y.cuda_slice::<bf16>("test").unwrap())
        .arg(&n);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 64 * 1024,
    };
    // SAFETY: cast_f32_bf16(const float*, bf16*, long long) over 32 elements; the launch is
    // expected to be refused before it runs.
    let err = unsafe { dev.launch("cast_f32_bf16", b, cfg) }.unwrap_err();
    assert!(err.to_string().contains("launching cast_f32_bf16"), "{err}");
    dev.synchronize().unwrap();
    assert_eq!(y.to_vec::<bf16>().unwrap(), vec![bf16::ZERO; 32]);
}

/// The child half of `device_cuda_kernel_fault_names_its_kernel`: faults the device on purpose and
/// prints the error the next call reports. A fault loses the CUDA context, so this runs only in a
/// process of its own.
#[test]
#[ignore = "run by device_cuda_kernel_fault_names_its_kernel in a process of its own"]
fn device_cuda_fault_on_purpose_child() {
    use cudarc::driver::PushKernelArg;
    let dev = CudaDevice::get(0).unwrap();
    // Another kernel first, so the report has more than one suspect.
    let x = Tensor::from_vec(vec![1.0f32; 32], &[32], &Device::Cuda(0)).unwrap();
    let _ = qlora_rs::ops::embedding::cast_cuda(&x, DType::BF16).unwrap();
    let f = dev.function("testing", "fault_on_purpose").unwrap();
    let null = 0u64;
    let mut b = dev.stream().launch_builder(f);
    b.arg(&null);
    // SAFETY: deliberately violated: the kernel writes through a null pointer, which faults the
    // device of this process (and only this one).
    let launched = unsafe { dev.launch("fault_on_purpose", b, device::cuda::grid_1d(32, 32)) };
    let err = launched.and_then(|()| dev.synchronize()).unwrap_err();
    println!("FAULT REPORT: {err}");
}

/// A kernel fault surfaces at a later call, under that call's name; the error also names the
/// kernels launched since the last synchronisation, and with `QLORA_SYNC=1` the faulting kernel.
#[test]
fn device_cuda_kernel_fault_names_its_kernel() {
    let Some(_) = gpu_or_skip("device_cuda_kernel_fault_names_its_kernel") else {
        return;
    };
    for sync in ["0", "1"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "device::device_cuda_fault_on_purpose_child",
            ])
            .arg("--nocapture")
            .env("QLORA_SYNC", sync)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = stdout
            .lines()
            .find_map(|l| l.strip_prefix("FAULT REPORT: "))
            .unwrap_or_else(|| {
                panic!(
                    "QLORA_SYNC={sync}: no fault report:\n{stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        if sync == "1" {
            assert!(
                report.contains("kernel fault_on_purpose (QLORA_SYNC=1)"),
                "{report}"
            );
        } else {
            assert!(
                report.contains("synchronising the stream (kernel fault in one of: ")
                    && report.contains(", fault_on_purpose; rerun with QLORA_SYNC=1 to name it"),
                "{report}"
            );
        }
    }
}

/// Every launcher whose kernel takes dynamic shared memory opts in for it (cuFuncSetAttribute)
/// instead of leaning on the 48 KiB a block gets by default: on the simulated GPU, with that
/// default set to 0 bytes, the plain GEMM (split and unsplit), the NF4 GEMMs, the fused LoRA
/// views and the flash-attention backward still run. On a real GPU the setting does not exist,
/// so the test says so and passes.
#[test]
fn device_cuda_dynamic_shared_memory_is_always_opted_into() {
    let Some(_) = gpu_or_skip("device_cuda_dynamic_shared_memory_is_always_opted_into") else {
        return;
    };
    if !crate::common::on_simulator() {
        eprintln!("device_cuda_dynamic_shared_memory_is_always_opted_into: SKIPPED (needs the simulated GPU's QLORA_SIM_DYNAMIC_SMEM_DEFAULT)");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "gemm::gemm_split_k_count_can_be_pinned",
            "gemm::gemm_and_lora_launchers_refuse_what_their_kernels_cannot_take",
            "flash::flash_attention_packed_batches_equal_each_sequence_alone",
        ])
        .env("QLORA_SIM_DYNAMIC_SMEM_DEFAULT", "0")
        .env("QLORA_REQUIRE_GPU", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 3 passed"),
        "with no dynamic shared memory by default:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
