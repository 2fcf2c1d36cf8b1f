//! Starting the workers of a run: one on the CPU, N CPU threads joined by an in-process
//! all-reduce, or one thread per GPU joined by NCCL (across nodes too).

use candle_core::Device;

use super::collective::{Collective, InProcessGroup, SingleWorker};
use super::run::{RunContext, WorkerOutcome};
use super::worker::Worker;
use crate::error::{Error, Result};

/// Runs `work(local_rank)` for every local worker, each on its own thread (rank 0 on this
/// one), and returns rank 0's outcome or the first root-cause error.
fn run_local_workers<F>(workers: usize, work: F) -> Result<WorkerOutcome>
where
    F: Fn(usize) -> Result<WorkerOutcome> + Sync,
{
    let work = &work;
    let results: Vec<Result<WorkerOutcome>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..workers)
            .map(|rank| {
                std::thread::Builder::new()
                    .name(format!("kb-train-worker-{rank}"))
                    .spawn_scoped(scope, move || work(rank))
                    .expect("spawn a training worker")
            })
            .collect();
        let mut results = vec![work(0)];
        for h in handles {
            results.push(
                h.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("a training worker panicked".into()))),
            );
        }
        results
    });
    let mut outcome = None;
    let mut root_cause: Option<Error> = None;
    for r in results {
        match r {
            Ok(o) => {
                outcome.get_or_insert(o);
            }
            // The first error, replaced by the first one that is not only a report of another
            // worker's failure.
            Err(e) => {
                if root_cause
                    .as_ref()
                    .is_none_or(|first| first.is_peer_failure() && !e.is_peer_failure())
                {
                    root_cause = Some(e);
                }
            }
        }
    }
    match root_cause {
        Some(e) => Err(e),
        None => Ok(outcome.expect("at least one worker")),
    }
}

/// Runs a worker, telling the others through `comm` if it fails.
fn run_worker_guarded<C: Collective>(
    ctx: &RunContext<'_>,
    comm: &C,
    device: Device,
) -> Result<WorkerOutcome> {
    let result = (|| {
        let (trainable, optimizer) = ctx.setup.replica(ctx.settings, &device)?;
        Worker::new(ctx, comm, device, trainable, optimizer)?.run()
    })();
    if let Err(e) = &result {
        comm.abort(&e.to_string());
    }
    result
}

pub(crate) fn run_cpu_workers(ctx: &RunContext<'_>) -> Result<WorkerOutcome> {
    let n = ctx.settings.dp_workers;
    if n == 1 {
        return run_worker_guarded(ctx, &SingleWorker, Device::Cpu);
    }
    let group = InProcessGroup::new(n);
    run_local_workers(n, |rank| run_worker_guarded(ctx, &group[rank], Device::Cpu))
}

#[cfg(feature = "cuda")]
pub(crate) fn run_gpu_workers(ctx: &RunContext<'_>) -> Result<WorkerOutcome> {
    let s = ctx.settings;
    let devices = s.local_devices();
    if s.world_size() == 1 {
        let device = Device::new_cuda(devices[0])?;
        return run_worker_guarded(ctx, &SingleWorker, device);
    }
    run_nccl_workers(ctx, &devices)
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn run_gpu_workers(_ctx: &RunContext<'_>) -> Result<WorkerOutcome> {
    unreachable!("check_accelerator refuses GPUs in a build without CUDA")
}

#[cfg(all(feature = "cuda", feature = "nccl"))]
fn run_nccl_workers(ctx: &RunContext<'_>, devices: &[usize]) -> Result<WorkerOutcome> {
    use super::nccl::{shared_nccl_id, NcclCollective};
    use super::rendezvous::Rendezvous;
    let s = ctx.settings;
    let rendezvous = s
        .rendezvous
        .as_deref()
        .map(Rendezvous::parse)
        .transpose()
        .map_err(|e| Error::Invalid(format!("--rendezvous: {e}")))?;
    let id = shared_nccl_id(s.num_nodes, s.node_rank, rendezvous.as_ref())?;
    let local = devices.len();
    let world = s.world_size();
    let group = InProcessGroup::new(local);
    let result = run_local_workers(local, |local_rank| {
        let here = &group[local_rank];
        let joined = (|| {
            let device = Device::new_cuda(devices[local_rank])?;
            // Every local worker has its device before any blocks in NCCL's initialisation.
            here.all_reduce_f64(&mut [0.0])?;
            let rank = s.node_rank * local + local_rank;
            let comm = NcclCollective::join(id, rank, world, &device, here.clone())?;
            Ok::<_, Error>((device, comm))
        })();
        match joined {
            Ok((device, comm)) => run_worker_guarded(ctx, &comm, device),
            Err(e) => {
                here.abort(&e.to_string());
                Err(e)
            }
        }
    });
    if s.node_rank == 0 {
        if let Some(r) = &rendezvous {
            r.clean_up();
        }
    }
    result
}

#[cfg(all(feature = "cuda", not(feature = "nccl")))]
fn run_nccl_workers(_ctx: &RunContext<'_>, _devices: &[usize]) -> Result<WorkerOutcome> {
    unreachable!("check_accelerator refuses several GPUs in a build without NCCL")
}
