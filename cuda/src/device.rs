//! Finding a GPU: the driver loaded at run time, a clear error where there is none.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use crate::CudaError;

/// An opened GPU.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
}

impl Gpu {
    /// Opens GPU `ordinal`: `NoDriver` without libcuda, `NoDevice` when the driver has no
    /// such GPU, `Driver` when it fails.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        // SAFETY: only tries to open the library by its candidate names.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        // cuInit itself answers NO_DEVICE on a machine with a driver and no GPU.
        let found = match CudaContext::device_count() {
            Ok(n) => usize::try_from(n).unwrap_or(0),
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => return Err(CudaError::Driver(format!("counting GPUs: {e:?}"))),
        };
        if ordinal >= found {
            return Err(CudaError::NoDevice { ordinal, found });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::Driver(format!("GPU {ordinal}: {e:?}")))?;
        let name = ctx.name().map_err(|e| CudaError::Driver(format!("{e:?}")))?;
        let attr = |a| ctx.attribute(a).map_err(|e| CudaError::Driver(format!("{e:?}")));
        let capability = (
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        Ok(Gpu { ctx, name, capability })
    }

    /// The architecture to compile for: sm_90a on Hopper, sm_80 on Ampere and Ada (a
    /// CUBIN runs on later minor versions of its major one); None elsewhere (not yet
    /// supported).
    pub fn arch(&self) -> Option<&'static str> {
        match self.capability {
            (9, 0) => Some("sm_90a"),
            (8, _) => Some("sm_80"),
            _ => None,
        }
    }
}
