//! The per-device table of resolved kernels: what a launch looks up instead of loading a module
//! and finding a function by name.
//!
//! A launcher names its kernel with two `&'static str`s, the module and the function. Their
//! addresses are the key: the table is an open-addressed array of write-once slots, probed
//! linearly from a multiplicative hash of the two addresses, so a hit costs a few atomic loads —
//! no lock, no string hash, no allocation. Only the first launch of a kernel on a device takes the
//! insertion lock (and loads the module). A slot matches only the very same two strings (address
//! and length), so two literals with equal text are two slots of the same kernel: correct, if
//! one resolution more.

use std::sync::atomic::AtomicUsize;
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// Slots per device; more distinct (module, name) pairs than this is an error (there are a few
/// hundred kernels).
const SLOTS: usize = 1024;

/// One resolved kernel.
pub(super) struct Kernel<F> {
    module: &'static str,
    name: &'static str,
    /// The driver's handle.
    pub function: F,
    /// Dynamic shared memory the kernel has been allowed so far (bytes; 0 until opted in).
    pub shared_allowed: AtomicUsize,
}

/// Write-once slots keyed by the address of the module's and the kernel's name.
pub(super) struct KernelTable<F> {
    slots: Box<[OnceLock<Kernel<F>>]>,
    /// Held to fill a slot, and to change a kernel's shared-memory allowance.
    pub insert_lock: Mutex<()>,
}

fn same(a: &'static str, b: &'static str) -> bool {
    std::ptr::eq(a, b)
}

impl<F> KernelTable<F> {
    pub fn new() -> Self {
        KernelTable {
            slots: (0..SLOTS).map(|_| OnceLock::new()).collect(),
            insert_lock: Mutex::new(()),
        }
    }

    fn home(module: &'static str, name: &'static str) -> usize {
        let key = (name.as_ptr() as u64) ^ (module.as_ptr() as u64).rotate_left(29);
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SLOTS.trailing_zeros())) as usize
    }

    /// The slots from the key's home on, wrapping once around.
    fn probe(&self, module: &'static str, name: &'static str) -> impl Iterator<Item = usize> {
        let home = Self::home(module, name);
        (0..SLOTS).map(move |i| (home + i) % SLOTS)
    }

    /// The kernel resolved for exactly these two strings, if any. Slots are never emptied, so
    /// the first empty slot on the probe ends the search.
    pub fn find(&self, module: &'static str, name: &'static str) -> Option<&Kernel<F>> {
        for i in self.probe(module, name) {
            match self.slots[i].get() {
                Some(k) if same(k.module, module) && same(k.name, name) => return Some(k),
                Some(_) => continue,
                None => return None,
            }
        }
        None
    }

    /// The kernel for these strings, resolved with `load` if no thread has done so yet. An error
    /// from `load` fills no slot (the next launch tries again and gets the same error).
    pub fn insert(
        &self,
        module: &'static str,
        name: &'static str,
        load: impl FnOnce() -> Result<F>,
    ) -> Result<&Kernel<F>> {
        let _filling = self.insert_lock.lock().unwrap_or_else(|p| p.into_inner());
        for i in self.probe(module, name) {
            let slot = &self.slots[i];
            match slot.get() {
                Some(k) if same(k.module, module) && same(k.name, name) => return Ok(k),
                Some(_) => continue,
                None => {
                    let kernel = Kernel {
                        module,
                        name,
                        function: load()?,
                        shared_allowed: AtomicUsize::new(0),
                    };
                    return Ok(slot.get_or_init(|| kernel));
                }
            }
        }
        Err(Error::CudaUnavailable(format!(
            "kernel {name} ({module}.cu): more than {SLOTS} kernels resolved on one device"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_resolved_once_and_found_by_both_names() {
        let table = KernelTable::<usize>::new();
        let loads = std::cell::Cell::new(0);
        let load = |v: usize| {
            let loads = &loads;
            move || {
                loads.set(loads.get() + 1);
                Ok(v)
            }
        };
        assert!(table.find("gemm", "k").is_none());
        assert_eq!(table.insert("gemm", "k", load(1)).unwrap().function, 1);
        assert_eq!(table.insert("gemm", "k", load(99)).unwrap().function, 1);
        assert_eq!(loads.get(), 1, "a resolved kernel is not loaded again");
        assert_eq!(table.find("gemm", "k").unwrap().function, 1);
        // The same kernel name in another module is another kernel.
        assert!(table.find("nf4", "k").is_none());
        assert_eq!(table.insert("nf4", "k", load(2)).unwrap().function, 2);
        assert_eq!(table.find("gemm", "k").unwrap().function, 1);
        assert_eq!(table.find("nf4", "k").unwrap().function, 2);
        // A failed load fills nothing.
        let failed = table.insert("gemm", "missing", || {
            Err(Error::CudaUnavailable("no".into()))
        });
        assert!(failed.is_err());
        assert!(table.find("gemm", "missing").is_none());
    }

    #[test]
    fn colliding_keys_probe_on_and_a_full_table_is_an_error() {
        let table = KernelTable::<usize>::new();
        // Leaked names: SLOTS distinct addresses, so the probe sequences collide and wrap.
        let names: Vec<&'static str> = (0..SLOTS)
            .map(|i| &*Box::leak(format!("kernel_{i}").into_boxed_str()))
            .collect();
        for (i, &n) in names.iter().enumerate() {
            assert_eq!(table.insert("m", n, || Ok(i)).unwrap().function, i);
        }
        for (i, &n) in names.iter().enumerate() {
            assert_eq!(table.find("m", n).map(|k| k.function), Some(i), "{n}");
        }
        let err = table.insert("m", "one_more", || Ok(0)).err().unwrap();
        assert!(err.to_string().contains("one_more"), "{err}");
        assert!(table.find("m", "one_more").is_none());
    }
}
