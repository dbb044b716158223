//! The CUDA device: one context and one stream per GPU, a per-process cache of loaded modules
//! (each embedded fatbin is loaded once per device), and the launch helper every op uses.
//!
//! A kernel fault (an illegal address, a trap) is asynchronous: it surfaces at a later driver
//! call, under that call's name. So the kernels launched since the last synchronisation are kept
//! (the newest [`IN_FLIGHT_NAMES`] names and a count), and an error whose code is such a sticky
//! fault names them ("kernel fault in one of: …"). `QLORA_SYNC=1` makes every launch synchronise
//! and check, so the fault is reported with the name of the one kernel that caused it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchArgs, LaunchConfig,
};
use cudarc::nvrtc::Ptx;
use half::{bf16, f16};

use super::{kernel_table, kernels, Availability, CpuStorage};
use crate::error::{Error, Result};
use crate::tensor::DType;

type Kernel = kernel_table::Kernel<CudaFunction>;
type KernelTable = kernel_table::KernelTable<CudaFunction>;

/// Whether `libcuda` can be loaded. Must be true before any other cudarc call: cudarc panics
/// when the library is missing.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen libcuda by its usual names; no CUDA call is made.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

/// How many of the kernels launched since the last synchronisation a fault report names.
pub const IN_FLIGHT_NAMES: usize = 8;

/// Kernels launched since the last synchronisation, process-wide (a fault is reported by whatever
/// call meets it, which may not know the device): the newest names and how many there were.
struct InFlight {
    names: VecDeque<&'static str>,
    count: usize,
}

static IN_FLIGHT: Mutex<InFlight> = Mutex::new(InFlight {
    names: VecDeque::new(),
    count: 0,
});

/// Kernels launched by this process, on every device (for `bench`: launches per step).
static LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many kernels this process has launched so far, on every device.
pub fn launches() -> u64 {
    LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

fn in_flight() -> std::sync::MutexGuard<'static, InFlight> {
    IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner())
}

fn note_launch(name: &'static str) {
    let mut f = in_flight();
    if f.names.len() == IN_FLIGHT_NAMES {
        f.names.pop_front();
    }
    f.names.push_back(name);
    f.count += 1;
}

fn note_synchronized() {
    let mut f = in_flight();
    f.names.clear();
    f.count = 0;
}

/// Whether a driver error is a kernel fault, which the driver reports at a later call and keeps
/// reporting (the context is lost).
fn is_kernel_fault(e: &cudarc::driver::DriverError) -> bool {
    use cudarc::driver::sys::CUresult::*;
    matches!(
        e.0,
        CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ASSERT
            | CUDA_ERROR_LAUNCH_TIMEOUT
    )
}

/// For an error that is a kernel fault: which kernels may have caused it, as a clause for the
/// message; `None` for other errors or when no kernel is in flight.
pub(crate) fn fault_suspects(e: &cudarc::driver::DriverError) -> Option<String> {
    if !is_kernel_fault(e) {
        return None;
    }
    let f = in_flight();
    if f.count == 0 {
        return None;
    }
    let names: Vec<&str> = f.names.iter().copied().collect();
    let earlier = match f.count - names.len() {
        0 => String::new(),
        n => format!(" (and {n} earlier)"),
    };
    Some(format!(
        "kernel fault in one of: {}{earlier}; rerun with QLORA_SYNC=1 to name it",
        names.join(", ")
    ))
}

/// Device memory of one dtype.
#[derive(Debug)]
pub enum CudaStorage {
    /// [`DType::F32`] values.
    F32(CudaSlice<f32>),
    /// [`DType::BF16`] values.
    BF16(CudaSlice<bf16>),
    /// [`DType::F16`] values.
    F16(CudaSlice<f16>),
    /// [`DType::U8`] values.
    U8(CudaSlice<u8>),
    /// [`DType::I32`] values.
    I32(CudaSlice<i32>),
}

macro_rules! each_storage {
    ($s:expr, $v:ident => $e:expr) => {
        match $s {
            CudaStorage::F32($v) => $e,
            CudaStorage::BF16($v) => $e,
            CudaStorage::F16($v) => $e,
            CudaStorage::U8($v) => $e,
            CudaStorage::I32($v) => $e,
        }
    };
}

impl CudaStorage {
    /// The element type held.
    pub fn dtype(&self) -> DType {
        match self {
            CudaStorage::F32(_) => DType::F32,
            CudaStorage::BF16(_) => DType::BF16,
            CudaStorage::F16(_) => DType::F16,
            CudaStorage::U8(_) => DType::U8,
            CudaStorage::I32(_) => DType::I32,
        }
    }

    /// Number of elements (not bytes).
    pub fn len(&self) -> usize {
        each_storage!(self, s => s.len())
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// CUDA ordinal of the GPU the memory is on.
    pub fn ordinal(&self) -> usize {
        each_storage!(self, s => s.ordinal())
    }

    /// The raw device address, for kernels that take pointers inside a parameter struct. The
    /// caller keeps the storage alive until the kernel has run (frees are stream-ordered).
    pub(crate) fn device_ptr(&self) -> u64 {
        use cudarc::driver::DevicePtr;
        each_storage!(self, s => {
            let (ptr, _sync) = s.device_ptr(s.stream());
            ptr
        })
    }

    /// Copies to the host (synchronous).
    pub fn download(&self) -> Result<CpuStorage> {
        let err = Error::cuda("device to host copy");
        let host = match self {
            CudaStorage::F32(s) => CpuStorage::F32(s.stream().clone_dtoh(s).map_err(err)?),
            CudaStorage::BF16(s) => CpuStorage::BF16(s.stream().clone_dtoh(s).map_err(err)?),
            CudaStorage::F16(s) => CpuStorage::F16(s.stream().clone_dtoh(s).map_err(err)?),
            CudaStorage::U8(s) => CpuStorage::U8(s.stream().clone_dtoh(s).map_err(err)?),
            CudaStorage::I32(s) => CpuStorage::I32(s.stream().clone_dtoh(s).map_err(err)?),
        };
        // The copy waited for the stream: every kernel launched before it has run.
        note_synchronized();
        Ok(host)
    }
}

/// One GPU: its context, the stream all our work goes to, and its loaded modules.
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Every kernel resolved so far, found on each launch without a lock or a string hash.
    kernels: KernelTable,
    sync_each_launch: bool,
    /// Read once at creation, for the launchers' tiling choices: streaming multiprocessors,
    /// shared memory per SM and the part reserved per block (bytes).
    multiprocessors: usize,
    shared_per_sm: (usize, usize),
    /// The split-K GEMMs' per-tile counters (zero between launches), grown on demand.
    tile_counters: Mutex<Option<cudarc::driver::CudaSlice<u32>>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice(cuda:{})", self.ordinal)
    }
}

impl CudaDevice {
    /// The process-wide handle of GPU `ordinal`, created on first use. Errors (never panics) when
    /// this build has no kernels, there is no driver, or no such GPU.
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        // Every op asks for its device, so the usual ordinals are found without a lock.
        static FIRST: [OnceLock<Arc<CudaDevice>>; 16] = [const { OnceLock::new() }; 16];
        if let Some(dev) = FIRST.get(ordinal).and_then(OnceLock::get) {
            return Ok(dev.clone());
        }
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
        let mut devices = DEVICES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(dev) = devices.get(&ordinal) {
            return Ok(dev.clone());
        }
        if let Some(why) = Availability::probe().cuda_unavailable_reason(ordinal) {
            return Err(Error::CudaUnavailable(why));
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::cuda("creating the CUDA context"))?;
        // SAFETY: every tensor of this device lives on its one stream, so cudarc's cross-stream
        // event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory_pooled(&ctx)?;
        let stream = ctx
            .new_stream()
            .map_err(Error::cuda("creating the CUDA stream"))?;
        let attribute = |a, what| {
            ctx.attribute(a)
                .map(|v| v.max(0) as usize)
                .map_err(Error::cuda(what))
        };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let multiprocessors = attribute(
            A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "reading the multiprocessor count",
        )?
        .max(1);
        let smem = "reading the shared memory per multiprocessor";
        let shared_per_sm = (
            attribute(
                A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
                smem,
            )?,
            attribute(
                A::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK,
                smem,
            )?,
        );
        let dev = Arc::new(CudaDevice {
            ordinal,
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            kernels: KernelTable::new(),
            sync_each_launch: std::env::var("QLORA_SYNC").is_ok_and(|v| v == "1"),
            multiprocessors,
            shared_per_sm,
            tile_counters: Mutex::new(None),
        });
        devices.insert(ordinal, dev.clone());
        if let Some(slot) = FIRST.get(ordinal) {
            // Under the lock above, so the slot is empty: this is its only setter.
            let _ = slot.set(dev.clone());
        }
        Ok(dev)
    }

    /// CUDA ordinal of this GPU.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The one stream every kernel, copy and allocation of this GPU goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The GPU's name as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.ctx.name().map_err(Error::cuda("reading the GPU name"))
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.ctx
            .compute_capability()
            .map_err(Error::cuda("reading the compute capability"))
    }

    /// The device address of at least `n` u32 counters, zero between kernels: a split-K GEMM
    /// counts there the splits of each output tile that have finished, and the last resets the
    /// count (kernels/gemm.cu, `split_finish`). One buffer serves every launch, since this GPU's
    /// kernels run one after another on its one stream; a larger need replaces it (the old one
    /// is freed in stream order, after the kernels that use it).
    pub fn tile_counters(&self, n: usize) -> Result<u64> {
        use cudarc::driver::DevicePtr;
        let mut counters = self.tile_counters.lock().unwrap_or_else(|p| p.into_inner());
        if counters.as_ref().is_none_or(|c| c.len() < n) {
            let len = n.max(1024).next_power_of_two();
            let fresh = self
                .stream
                .alloc_zeros::<u32>(len)
                .map_err(Error::cuda("allocating the split-K tile counters"))?;
            *counters = Some(fresh);
        }
        let c = counters.as_ref().expect("allocated above");
        let (ptr, _sync) = c.device_ptr(&self.stream);
        Ok(ptr)
    }

    /// Streaming multiprocessors (read when the device was created).
    pub fn multiprocessor_count(&self) -> usize {
        self.multiprocessors
    }

    /// Shared memory per streaming multiprocessor and the part of it the system reserves per
    /// resident block, bytes: `(per SM, reserved per block)` (read when the device was created).
    pub fn shared_memory_per_multiprocessor(&self) -> (usize, usize) {
        self.shared_per_sm
    }

    /// Device memory in use (total − free, as the driver reports it), bytes.
    pub fn memory_used(&self) -> Result<usize> {
        self.ctx
            .mem_get_info()
            .map(|(free, total)| total.saturating_sub(free))
            .map_err(Error::cuda("reading the memory in use"))
    }

    /// High-water marks of the device's stream-ordered pool, which every tensor we allocate comes
    /// from: `(peak bytes allocated, peak bytes reserved)`, the counterparts of PyTorch's
    /// `max_memory_allocated` / `max_memory_reserved` (the CUDA context and the loaded kernels
    /// are outside the pool: see [`CudaDevice::memory_used`]). `None` on a device without memory
    /// pools.
    pub fn pool_peaks(&self) -> Result<Option<(u64, u64)>> {
        use cudarc::driver::{result, sys};
        let what = "reading the memory pool's high-water marks";
        let Some(pool) = default_pool(&self.ctx, what)? else {
            return Ok(None);
        };
        let read = |attr| {
            let mut v = 0u64;
            // SAFETY: the pool handle comes from the driver; both attributes are u64s written
            // through the pointer.
            unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()) }
                .map(|()| v)
                .map_err(Error::cuda(what))
        };
        Ok(Some((
            read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        )))
    }

    /// Total device memory in bytes.
    pub fn total_memory(&self) -> Result<usize> {
        self.ctx
            .total_mem()
            .map_err(Error::cuda("reading the memory size"))
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(Error::cuda("synchronising the stream"))?;
        note_synchronized();
        Ok(())
    }

    /// Kernel `name` from `kernels/<module>.cu`, loading the module on first use. The handle is
    /// resolved once per device (module load, function lookup); every later call for the same
    /// `module` and `name` finds it in [`KernelTable`] with a few atomic loads.
    pub fn function(&self, module: &'static str, name: &'static str) -> Result<&CudaFunction> {
        Ok(&self.kernel(module, name)?.function)
    }

    /// The table entry of `module`'s kernel `name`, resolving it on first use.
    fn kernel(&self, module: &'static str, name: &'static str) -> Result<&Kernel> {
        if let Some(k) = self.kernels.find(module, name) {
            return Ok(k);
        }
        self.kernels
            .insert(module, name, || self.load_function(module, name))
    }

    /// Loads `module` if needed and finds `name` in it (the slow path of [`CudaDevice::function`]).
    fn load_function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        let module_handle = {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(module) {
                Some(m) => m.clone(),
                None => {
                    let bytes = kernels::fatbin(module).ok_or_else(|| {
                        Error::CudaUnavailable(format!(
                            "kernels/{module}.cu is not in this build: {}",
                            super::NO_KERNELS
                        ))
                    })?;
                    let m = self
                        .ctx
                        .load_module(Ptx::from_binary(bytes.to_vec()))
                        .map_err(Error::cuda_with(|| format!("loading kernels/{module}.cu")))?;
                    modules.insert(module, m.clone());
                    m
                }
            }
        };
        module_handle
            .load_function(name)
            .map_err(Error::cuda_with(|| {
                format!("finding kernel {name} in {module}.cu")
            }))
    }

    /// Kernel `name` from `kernels/<module>.cu`, allowed `bytes` of dynamic shared memory per
    /// block. Every launcher whose kernel takes dynamic shared memory comes here, whatever the
    /// size: the 48 KiB a block gets without opting in is a default, not a promise that a tile or
    /// stage count will stay under it. The attribute is set once per kernel and size (after that
    /// a launch reads one atomic); more than the card allows is an error naming the kernel.
    pub fn function_with_shared(
        &self,
        module: &'static str,
        name: &'static str,
        bytes: usize,
    ) -> Result<&CudaFunction> {
        use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
        use std::sync::atomic::Ordering;
        let k = self.kernel(module, name)?;
        if k.shared_allowed.load(Ordering::Acquire) >= bytes {
            return Ok(&k.function);
        }
        // Serialised so that two threads cannot lower each other's allowance.
        let _raising = self
            .kernels
            .insert_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if k.shared_allowed.load(Ordering::Acquire) >= bytes {
            return Ok(&k.function);
        }
        let most = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(Error::cuda("reading the shared memory limit"))?;
        if bytes > most.max(0) as usize {
            return Err(Error::CudaUnavailable(format!(
                "kernel {name} ({module}.cu) needs {bytes} bytes of shared memory per block; this \
                 GPU allows {most}"
            )));
        }
        k.function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(Error::cuda_with(|| {
                format!("allowing {bytes} bytes of shared memory for {name}")
            }))?;
        k.shared_allowed.store(bytes, Ordering::Release);
        Ok(&k.function)
    }

    /// Launches a kernel whose arguments are already pushed onto `args`, then (with
    /// `QLORA_SYNC=1`) synchronises and reports a fault under the kernel's name.
    ///
    /// # Safety
    /// The pushed arguments must match the kernel's C signature in number, order and type, and
    /// every buffer must be large enough for the indices the kernel computes from `cfg` and its
    /// scalar arguments. Launchers check these at entry and say so in a `// SAFETY:` line.
    pub unsafe fn launch(
        &self,
        name: &'static str,
        mut args: LaunchArgs<'_>,
        cfg: LaunchConfig,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { args.launch(cfg) }.map_err(Error::cuda_with(|| format!("launching {name}")))?;
        LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !self.sync_each_launch {
            note_launch(name);
        } else {
            self.stream
                .synchronize()
                .map_err(Error::cuda_with(|| format!("kernel {name} (QLORA_SYNC=1)")))?;
        }
        Ok(())
    }

    /// A buffer of `n` elements whose contents are unspecified (no memset): for outputs a kernel
    /// overwrites whole. Every element type we store is valid for any bit pattern.
    pub fn alloc_uninit(&self, dtype: DType, n: usize) -> Result<CudaStorage> {
        let s = &self.stream;
        let err = Error::cuda_with(|| format!("allocating {n} {dtype} elements"));
        // SAFETY: `alloc` hands out device memory without initialising it; f32, bf16, f16, u8
        // and i32 have no invalid bit patterns, and the memory is only read through copies and
        // kernels, never as Rust references.
        Ok(unsafe {
            match dtype {
                DType::F32 => CudaStorage::F32(s.alloc(n).map_err(err)?),
                DType::BF16 => CudaStorage::BF16(s.alloc(n).map_err(err)?),
                DType::F16 => CudaStorage::F16(s.alloc(n).map_err(err)?),
                DType::U8 => CudaStorage::U8(s.alloc(n).map_err(err)?),
                DType::I32 => CudaStorage::I32(s.alloc(n).map_err(err)?),
            }
        })
    }

    /// A zero-filled buffer of `n` elements.
    pub fn alloc_zeros(&self, dtype: DType, n: usize) -> Result<CudaStorage> {
        let s = &self.stream;
        let err = Error::cuda_with(|| format!("allocating {n} {dtype} elements"));
        Ok(match dtype {
            DType::F32 => CudaStorage::F32(s.alloc_zeros(n).map_err(err)?),
            DType::BF16 => CudaStorage::BF16(s.alloc_zeros(n).map_err(err)?),
            DType::F16 => CudaStorage::F16(s.alloc_zeros(n).map_err(err)?),
            DType::U8 => CudaStorage::U8(s.alloc_zeros(n).map_err(err)?),
            DType::I32 => CudaStorage::I32(s.alloc_zeros(n).map_err(err)?),
        })
    }

    /// Copies host storage to a new device buffer.
    pub fn upload(&self, host: &CpuStorage) -> Result<CudaStorage> {
        let s = &self.stream;
        let err = Error::cuda("host to device copy");
        Ok(match host {
            CpuStorage::F32(v) => CudaStorage::F32(s.clone_htod(v).map_err(err)?),
            CpuStorage::BF16(v) => CudaStorage::BF16(s.clone_htod(v).map_err(err)?),
            CpuStorage::F16(v) => CudaStorage::F16(s.clone_htod(v).map_err(err)?),
            CpuStorage::U8(v) => CudaStorage::U8(s.clone_htod(v).map_err(err)?),
            CpuStorage::I32(v) => CudaStorage::I32(s.clone_htod(v).map_err(err)?),
        })
    }

    /// Copies a device buffer of this GPU to a new one.
    pub fn copy(&self, src: &CudaStorage) -> Result<CudaStorage> {
        let s = &self.stream;
        let err = Error::cuda("device to device copy");
        Ok(match src {
            CudaStorage::F32(v) => CudaStorage::F32(s.clone_dtod(v).map_err(err)?),
            CudaStorage::BF16(v) => CudaStorage::BF16(s.clone_dtod(v).map_err(err)?),
            CudaStorage::F16(v) => CudaStorage::F16(s.clone_dtod(v).map_err(err)?),
            CudaStorage::U8(v) => CudaStorage::U8(s.clone_dtod(v).map_err(err)?),
            CudaStorage::I32(v) => CudaStorage::I32(s.clone_dtod(v).map_err(err)?),
        })
    }
}

/// A 1-D launch: `n` work items, `block` threads per block.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u64).div_ceil(block as u64).max(1) as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Tensors are allocated stream-ordered (`cuMemAllocAsync`) from the device's default pool. By
/// default that pool hands freed memory back to the driver at every synchronisation, so each
/// training step would map its activations afresh. A release threshold of "never" keeps freed
/// blocks in the pool for the next step: after the first step the step allocates nothing from the
/// driver, and the memory in use (`memory_used`) is the pool's high-water mark, which is what
/// `bench` reports as the footprint. Devices without memory pools allocate synchronously (cudarc's
/// choice) and are left as they are.
fn keep_freed_memory_pooled(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::{result, sys};
    let what = "keeping freed device memory in the stream-ordered pool";
    let Some(pool) = default_pool(ctx, what)? else {
        return Ok(());
    };
    let mut threshold = u64::MAX;
    // SAFETY: the pool handle comes from the driver, and the release threshold attribute takes
    // a pointer to a u64.
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .map_err(Error::cuda(what))
}

/// The device's default stream-ordered memory pool, or `None` on a device without pools.
fn default_pool(
    ctx: &CudaContext,
    what: &'static str,
) -> Result<Option<cudarc::driver::sys::CUmemoryPool>> {
    use cudarc::driver::{result, sys};
    // SAFETY: cu_device is the context's valid device handle.
    let pools = unsafe {
        result::device::get_attribute(
            ctx.cu_device(),
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED,
        )
    }
    .map_err(Error::cuda(what))?;
    if pools == 0 {
        return Ok(None);
    }
    // SAFETY: as above.
    unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }
        .map(Some)
        .map_err(Error::cuda(what))
}
