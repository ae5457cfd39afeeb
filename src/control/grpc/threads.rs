//! The `Threads` gRPC service: the same operations as `/v1/threads` on
//! the JSON port, on the records' own messages.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::threads_server;
use crate::api::{
    CopyThreadRequest, CopyThreadResponse, DeleteThreadRequest, DeleteThreadResponse,
    DeleteThreadRunRequest, GetThreadCheckpointRequest, ListThreadCheckpointsRequest,
    ListThreadCheckpointsResponse, PruneThreadRequest, PutThreadCheckpointRequest,
    PutThreadCheckpointResponse, PutThreadWritesRequest, PutThreadWritesResponse, ThreadCheckpoint,
};
use crate::control::plane::{ControlPlane, ThreadListing};
use crate::control::store::threads::NewThreadCheckpoint;

/// The `Threads` service.
#[derive(Debug, Clone)]
pub struct ThreadsService(pub Arc<ControlPlane>);

#[tonic::async_trait]
impl threads_server::Threads for ThreadsService {
    async fn put(
        &self,
        request: Request<PutThreadCheckpointRequest>,
    ) -> Result<Response<PutThreadCheckpointResponse>, Status> {
        let r = request.into_inner();
        let run_id = match serde_json::from_str::<serde_json::Value>(&r.metadata_json) {
            Ok(serde_json::Value::Object(metadata)) => match metadata.get("run_id") {
                Some(serde_json::Value::String(run)) => run.clone(),
                _ => String::new(),
            },
            Ok(_) | Err(_) if r.metadata_json.is_empty() => String::new(),
            _ => {
                return Err(Status::invalid_argument(
                    "metadata_json must be a JSON object",
                ));
            }
        };
        let metadata_json = if r.metadata_json.is_empty() {
            "{}".to_owned()
        } else {
            r.metadata_json
        };
        let new = NewThreadCheckpoint {
            checkpoint: ThreadCheckpoint {
                thread_id: r.thread_id,
                checkpoint_ns: r.checkpoint_ns,
                checkpoint_id: r.checkpoint_id,
                parent_checkpoint_id: r.parent_checkpoint_id,
                checkpoint: r.checkpoint,
                metadata_json,
                channel_versions: r.channel_versions,
                run_id,
                ..ThreadCheckpoint::default()
            },
            blobs: r.blobs,
        };
        let stored = self.0.put_thread_checkpoint(new).await?;
        Ok(Response::new(PutThreadCheckpointResponse {
            created_at: stored.created_at,
        }))
    }

    async fn put_writes(
        &self,
        request: Request<PutThreadWritesRequest>,
    ) -> Result<Response<PutThreadWritesResponse>, Status> {
        let r = request.into_inner();
        let stored = self
            .0
            .put_thread_writes(&r.thread_id, &r.checkpoint_ns, &r.checkpoint_id, r.writes)
            .await?;
        Ok(Response::new(PutThreadWritesResponse { stored }))
    }

    async fn get(
        &self,
        request: Request<GetThreadCheckpointRequest>,
    ) -> Result<Response<ThreadCheckpoint>, Status> {
        let r = request.get_ref();
        let id = Some(r.checkpoint_id.as_str()).filter(|i| !i.is_empty());
        Ok(Response::new(self.0.get_thread_checkpoint(
            &r.thread_id,
            &r.checkpoint_ns,
            id,
        )?))
    }

    async fn list(
        &self,
        request: Request<ListThreadCheckpointsRequest>,
    ) -> Result<Response<ListThreadCheckpointsResponse>, Status> {
        let r = request.into_inner();
        let (checkpoints, next_page_token) = self.0.list_thread_checkpoints(ThreadListing {
            thread_id: r.thread_id,
            checkpoint_ns: r.checkpoint_ns,
            before: r.before,
            filter: r.filter_json,
            page_size: r.page_size,
            page_token: r.page_token,
        })?;
        Ok(Response::new(ListThreadCheckpointsResponse {
            checkpoints,
            next_page_token,
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteThreadRequest>,
    ) -> Result<Response<DeleteThreadResponse>, Status> {
        let deleted = self.0.delete_thread(&request.get_ref().thread_id).await?;
        Ok(Response::new(DeleteThreadResponse { deleted }))
    }

    async fn delete_run(
        &self,
        request: Request<DeleteThreadRunRequest>,
    ) -> Result<Response<DeleteThreadResponse>, Status> {
        let deleted = self.0.delete_thread_run(&request.get_ref().run_id).await?;
        Ok(Response::new(DeleteThreadResponse { deleted }))
    }

    async fn copy(
        &self,
        request: Request<CopyThreadRequest>,
    ) -> Result<Response<CopyThreadResponse>, Status> {
        let r = request.get_ref();
        let copied = self
            .0
            .copy_thread(&r.source_thread_id, &r.target_thread_id)
            .await?;
        Ok(Response::new(CopyThreadResponse { copied }))
    }

    async fn prune(
        &self,
        request: Request<PruneThreadRequest>,
    ) -> Result<Response<DeleteThreadResponse>, Status> {
        let r = request.get_ref();
        let deleted = self.0.prune_thread(&r.thread_id, r.keep).await?;
        Ok(Response::new(DeleteThreadResponse { deleted }))
    }
}
