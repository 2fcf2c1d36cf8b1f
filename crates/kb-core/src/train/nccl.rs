//! NCCL all-reduce between GPU workers (feature `nccl`).
//!
//! Each GPU is driven by its own thread holding an NCCL communicator on the stream candle uses
//! for that device, so the reduction is queued behind the backward pass with no extra
//! synchronisation. The threads of one node also share an [`InProcessGroup`]: a failing worker
//! aborts it and the others stop at their next reduction instead of waiting for NCCL forever.

use std::rc::Rc;
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::collective::{Collective, InProcessGroup};
use super::rendezvous::Rendezvous;
use crate::error::{Error, Result};

/// Bytes in an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// How long nodes wait for each other at start-up.
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);

/// Creates the run's NCCL id on node 0 and hands it to the other nodes through `rendezvous`;
/// on the other nodes, receives it. A single-node run needs no rendezvous.
pub fn shared_nccl_id(
    num_nodes: usize,
    node_rank: usize,
    rendezvous: Option<&Rendezvous>,
) -> Result<Id> {
    let nccl = |e: candle_core::cuda::cudarc::nccl::result::NcclError| {
        Error::Invalid(format!("NCCL: {e:?}"))
    };
    if node_rank == 0 {
        let id = Id::new().map_err(nccl)?;
        if num_nodes > 1 {
            let r = rendezvous.ok_or_else(|| Error::Invalid("no rendezvous".into()))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            r.publish(&bytes, num_nodes - 1, RENDEZVOUS_TIMEOUT)?;
        }
        Ok(id)
    } else {
        let r = rendezvous.ok_or_else(|| Error::Invalid("no rendezvous".into()))?;
        let bytes = r.receive(NCCL_ID_BYTES, RENDEZVOUS_TIMEOUT)?;
        let mut internal = [0 as std::ffi::c_char; NCCL_ID_BYTES];
        for (dst, src) in internal.iter_mut().zip(bytes) {
            *dst = src as std::ffi::c_char;
        }
        Ok(Id::uninit(internal))
    }
}

/// One GPU worker's view of the NCCL group.
pub struct NcclCollective {
    op: AllReduceSum,
    local: InProcessGroup,
    device: Device,
    rank: usize,
    world: usize,
}

impl NcclCollective {
    /// Joins the group `id` as global `rank` of `world`, on `device` (a CUDA device); blocks
    /// until every rank has joined. `local` connects the workers of this process.
    pub fn join(
        id: Id,
        rank: usize,
        world: usize,
        device: &Device,
        local: InProcessGroup,
    ) -> Result<Self> {
        let stream = device.as_cuda_device()?.cuda_stream();
        let comm = Comm::from_rank(stream, rank, world, id)
            .map_err(|e| Error::Invalid(format!("NCCL: rank {rank} of {world}: {e:?}")))?;
        Ok(Self {
            op: AllReduceSum {
                comm: Rc::new(comm),
            },
            local,
            device: device.clone(),
            rank,
            world,
        })
    }

    /// Passes the process-local checkpoint: fails if a worker of this node aborted.
    fn local_checkpoint(&self) -> Result<()> {
        let mut x = [0.0];
        self.local.all_reduce_f64(&mut x)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        self.local_checkpoint()?;
        Ok(flat.contiguous()?.apply_op1_no_bwd(&self.op)?)
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        self.local_checkpoint()?;
        let t =
            Tensor::from_slice(values, values.len(), &self.device)?.apply_op1_no_bwd(&self.op)?;
        values.copy_from_slice(&t.to_vec1::<f64>()?);
        Ok(())
    }

    fn abort(&self, reason: &str) {
        self.local.abort(reason);
    }
}

/// Sums a contiguous f32/f64 CUDA tensor over the communicator's ranks.
struct AllReduceSum {
    comm: Rc<Comm>,
}

// SAFETY: the op is only applied from the thread that created the communicator (each worker
// thread owns its `NcclCollective`); candle merely requires the bounds of every custom op.
unsafe impl Send for AllReduceSum {}
unsafe impl Sync for AllReduceSum {}

impl CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL all-reduce needs tensors on a CUDA device")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("all-reduce input is not contiguous".into()))?;
        let device = storage.device().clone();
        let nccl = |e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}"));
        let out = match storage.dtype() {
            DType::F32 => {
                let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
                let mut dst = device.alloc_zeros::<f32>(end - start)?;
                self.comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(nccl)?;
                CudaStorage::wrap_cuda_slice(dst, device)
            }
            DType::F64 => {
                let src = storage.as_cuda_slice::<f64>()?.slice(start..end);
                let mut dst = device.alloc_zeros::<f64>(end - start)?;
                self.comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(nccl)?;
                CudaStorage::wrap_cuda_slice(dst, device)
            }
            other => candle_core::bail!("NCCL all-reduce of {other:?} is not supported"),
        };
        Ok((out, layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-rank NCCL group on GPU 0 (skipped on machines without a GPU): the all-reduces
    /// return their input, through NCCL, on the worker's stream.
    #[test]
    fn single_rank_nccl_group_reduces_to_its_input() {
        let Ok(device) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let id = shared_nccl_id(1, 0, None).unwrap();
        let local = InProcessGroup::new(1).remove(0);
        let comm = NcclCollective::join(id, 0, 1, &device, local).unwrap();
        let t = Tensor::arange(0f32, 1000f32, &device).unwrap();
        let sum = comm.all_reduce_sum(&t.narrow(0, 10, 500).unwrap()).unwrap();
        assert_eq!(sum.device().location(), device.location());
        assert_eq!(
            sum.to_vec1::<f32>().unwrap(),
            (10..510).map(|i| i as f32).collect::<Vec<_>>()
        );
        let mut v = [1.5, -2.0];
        comm.all_reduce_f64(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
    }
}
