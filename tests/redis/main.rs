//! The tests that need a real `redis-server`: the Redis cache backend and
//! its outages, and the cluster (its Redis primitives, several nodes
//! sharing one Redis, resumes across nodes). One test binary, so the shared
//! fixtures of `tests/common/` are compiled and linked once for all of them.

#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod cluster_primitives;
mod cluster_resume;
mod redis;
mod redis_outage;
