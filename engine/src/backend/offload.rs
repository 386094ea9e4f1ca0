//! A model offloaded to another backend (a GPU), run by the host as one of its own.
//!
//! The scheduler, the server and the C API hold models as `Architecture<CpuBackend>` and
//! manage their caches' blocks on the host. [`Offloaded`] is such an architecture whose
//! weights and caches live on a device backend: each host cache records the block changes
//! the scheduler makes (as rank 0's do for tensor parallelism), and each forward pass
//! replays them on the device's mirror of that cache before running the model there. The
//! host caches' storage is never written, so their zeroed pages stay untouched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use super::cpu::{CpuBackend, CpuKv};
use super::{Backend, KvCache};
use crate::gguf::Gguf;
use crate::kv::{KvLayout, KvSpec};
use crate::model::{self, Architecture, Batch, Logits, ModelInfo};
use crate::parallel::{sync_caches, CacheStep};
use crate::EngineError;

/// A model on `device`, driven through a recording host backend ([`CpuBackend::host`]).
pub struct Offloaded<B: Backend> {
    arch: Box<dyn Architecture<B>>,
    /// The device's mirrors of the host's caches, by host cache id. Locked for a whole
    /// pass: a device backend's per-pass state (its first error, cached positions) is
    /// shared by its clones, so passes take turns (a long embedding delays decoding). A
    /// host cache's mirror is dropped at the first pass after the host cache goes.
    caches: Mutex<Mirrors<B::Kv>>,
    /// Last: fields drop in order, and the device's memory pool gives memory back to the
    /// driver only for what the weights and caches freed before it goes.
    device: B,
}

struct Mirrors<K> {
    /// The host caches mirrored, with handles that die with them.
    mirrored: Vec<(u64, Weak<()>)>,
    caches: HashMap<u64, K>,
}

impl<B: Backend + 'static> Offloaded<B> {
    /// Loads `file`'s model onto `device`.
    pub fn load(device: B, file: &Arc<Gguf>) -> Result<Offloaded<B>, EngineError> {
        let arch = model::load(&device, file)?;
        let caches = Mutex::new(Mirrors { mirrored: Vec::new(), caches: HashMap::new() });
        Ok(Offloaded { arch, caches, device })
    }

    pub fn device(&self) -> &B {
        &self.device
    }

    /// Runs `run` on the device's mirror of `kv`, brought up to date with the block
    /// changes `kv` recorded since the last step.
    fn on_mirror<T>(
        &self,
        kv: &mut CpuKv,
        run: impl FnOnce(&B, &dyn Architecture<B>, &mut B::Kv) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if !kv.blocks().is_recording() {
            let why = "a cache not made by the model's host backend".into();
            return Err(EngineError::Device { device: self.device.name().into(), why });
        }
        let mut mirrors = self.caches.lock().unwrap_or_else(|e| e.into_inner());
        let Mirrors { mirrored, caches } = &mut *mirrors;
        for step in sync_caches(mirrored, kv) {
            match step {
                CacheStep::New { id, spec } => {
                    caches.insert(id, self.device.new_kv(&spec));
                }
                CacheStep::Drop { id } => {
                    caches.remove(&id);
                }
            }
        }
        let id = kv.blocks().identity().0;
        let ops = kv.blocks_mut().take_journal();
        let mirror = caches.get_mut(&id).ok_or_else(|| EngineError::Device {
            device: self.device.name().into(),
            why: format!("host cache {id} has no mirror"),
        })?;
        mirror.blocks_mut().apply(&ops)?;
        run(&self.device, &*self.arch, mirror)
    }
}

impl<B: Backend + 'static> Architecture<CpuBackend> for Offloaded<B> {
    fn info(&self) -> &ModelInfo {
        self.arch.info()
    }

    fn kv_layout(&self) -> KvLayout {
        self.arch.kv_layout()
    }

    fn kv_spec(&self, max_tokens: usize, n_seqs: usize) -> KvSpec {
        self.arch.kv_spec(max_tokens, n_seqs)
    }

    fn compute(&self, _host: &CpuBackend, batch: &Batch, kv: &mut CpuKv) -> Result<Logits, EngineError> {
        self.on_mirror(kv, |device, arch, mirror| arch.forward(device, batch, mirror))
    }

    fn compute_hidden(&self, _host: &CpuBackend, batch: &Batch, kv: &mut CpuKv) -> Result<Vec<f32>, EngineError> {
        self.on_mirror(kv, |device, arch, mirror| arch.forward_hidden(device, batch, mirror))
    }

    fn routing_stats(&self) -> Vec<Vec<u64>> {
        self.arch.routing_stats()
    }

    /// The device's model decides where its own pass runs.
    fn runs_on_global_pool(&self) -> bool {
        false
    }
}
