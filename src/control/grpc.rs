//! The gRPC face of the control plane: the `Checkpoints`, `DeadLetters`,
//! `Sagas` and `Threads` services, bearer token checks, health and
//! reflection.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::Auth;
use super::error::ApiError;
use super::plane::ControlPlane;
use super::saga::proto as saga_proto;
use crate::api::checkpoints_server::{self, CheckpointsServer};
use crate::api::dead_letters_server::{self, DeadLettersServer};
use crate::api::sagas_server::{self, SagasServer};
use crate::api::threads_server::ThreadsServer;
use crate::api::{
    AbortSagaRequest, GetSagaRequest, ListSagasRequest, ListSagasResponse, Saga, SagaEvent,
    StartSagaRequest, WatchSagasRequest,
};
use crate::api::{
    Checkpoint, DeadLetter, DeleteCheckpointsRequest, DeleteCheckpointsResponse,
    EnqueueDeadLetterRequest, GetCheckpointRequest, GetDeadLetterRequest, ListCheckpointsRequest,
    ListCheckpointsResponse, ListDeadLettersRequest, ListDeadLettersResponse,
    PruneCheckpointsRequest, PruneCheckpointsResponse, PurgeDeadLettersRequest,
    PurgeDeadLettersResponse, PutCheckpointRequest, PutCheckpointResponse, ReplayDeadLetterRequest,
    ReplayDeadLetterResponse,
};

mod threads;
pub use threads::ThreadsService;

/// Metadata carrying the latest version with an `ABORTED` answer.
pub const CURRENT_VERSION: &str = "x-breakwater-current-version";

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        match e {
            ApiError::Invalid(_) => Status::invalid_argument(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::Conflict { current, .. } => {
                let mut status = Status::aborted(message);
                status
                    .metadata_mut()
                    .insert(CURRENT_VERSION, current.into());
                status
            }
            ApiError::Precondition(_) => Status::failed_precondition(message),
            ApiError::Unauthenticated => Status::unauthenticated(message),
            ApiError::ReadOnly | ApiError::Forbidden(_) => Status::permission_denied(message),
            ApiError::Internal(_) => Status::internal(message),
        }
    }
}

/// The `Checkpoints` service.
#[derive(Debug, Clone)]
pub struct CheckpointsService(pub Arc<ControlPlane>);

#[tonic::async_trait]
impl checkpoints_server::Checkpoints for CheckpointsService {
    async fn put(
        &self,
        request: Request<PutCheckpointRequest>,
    ) -> Result<Response<PutCheckpointResponse>, Status> {
        Ok(Response::new(
            self.0.put_checkpoint(request.into_inner()).await?,
        ))
    }

    async fn get(
        &self,
        request: Request<GetCheckpointRequest>,
    ) -> Result<Response<Checkpoint>, Status> {
        Ok(Response::new(self.0.get_checkpoint(request.get_ref())?))
    }

    async fn list(
        &self,
        request: Request<ListCheckpointsRequest>,
    ) -> Result<Response<ListCheckpointsResponse>, Status> {
        Ok(Response::new(self.0.list_checkpoints(request.get_ref())?))
    }

    async fn delete(
        &self,
        request: Request<DeleteCheckpointsRequest>,
    ) -> Result<Response<DeleteCheckpointsResponse>, Status> {
        Ok(Response::new(
            self.0
                .delete_workflow(&request.get_ref().workflow_id)
                .await?,
        ))
    }

    async fn prune(
        &self,
        request: Request<PruneCheckpointsRequest>,
    ) -> Result<Response<PruneCheckpointsResponse>, Status> {
        Ok(Response::new(
            self.0.prune_workflow(request.get_ref()).await?,
        ))
    }
}

/// The `DeadLetters` service.
#[derive(Debug, Clone)]
pub struct DeadLettersService(pub Arc<ControlPlane>);

#[tonic::async_trait]
impl dead_letters_server::DeadLetters for DeadLettersService {
    async fn enqueue(
        &self,
        request: Request<EnqueueDeadLetterRequest>,
    ) -> Result<Response<DeadLetter>, Status> {
        Ok(Response::new(
            self.0.enqueue_letter(request.into_inner().letter).await?,
        ))
    }

    async fn list(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        Ok(Response::new(self.0.list_letters(request.get_ref())?))
    }

    async fn get(
        &self,
        request: Request<GetDeadLetterRequest>,
    ) -> Result<Response<DeadLetter>, Status> {
        Ok(Response::new(self.0.get_letter(&request.get_ref().id)?))
    }

    async fn replay(
        &self,
        request: Request<ReplayDeadLetterRequest>,
    ) -> Result<Response<ReplayDeadLetterResponse>, Status> {
        Ok(Response::new(
            self.0
                .replay_letter(&request.get_ref().id, request.get_ref().force)
                .await?,
        ))
    }

    async fn purge(
        &self,
        request: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        let purged = self.0.purge_letters(request.into_inner().target).await?;
        Ok(Response::new(PurgeDeadLettersResponse { purged }))
    }
}

/// The `Sagas` service.
#[derive(Debug, Clone)]
pub struct SagasService(pub Arc<ControlPlane>);

type EventStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<SagaEvent, Status>> + Send>>;

#[tonic::async_trait]
impl sagas_server::Sagas for SagasService {
    async fn start(&self, request: Request<StartSagaRequest>) -> Result<Response<Saga>, Status> {
        let definition = request
            .into_inner()
            .definition
            .ok_or_else(|| Status::invalid_argument("definition is missing"))?;
        let spec = saga_proto::spec_from_proto(definition).map_err(Status::invalid_argument)?;
        let (record, _) = self.0.sagas.start(spec).await?;
        Ok(Response::new(saga_proto::record_to_proto(&record, true)))
    }

    async fn get(&self, request: Request<GetSagaRequest>) -> Result<Response<Saga>, Status> {
        let record = self.0.sagas.get(&request.get_ref().id)?;
        Ok(Response::new(saga_proto::record_to_proto(&record, true)))
    }

    async fn list(
        &self,
        request: Request<ListSagasRequest>,
    ) -> Result<Response<ListSagasResponse>, Status> {
        let request = request.into_inner();
        let state = match request.state {
            0 => None,
            n => Some(
                saga_proto::state_from_proto(n)
                    .ok_or_else(|| Status::invalid_argument(format!("state {n} is not a state")))?,
            ),
        };
        let (records, next_page_token) =
            self.0
                .sagas
                .list_page(state, request.page_size, &request.page_token)?;
        Ok(Response::new(ListSagasResponse {
            sagas: records
                .iter()
                .map(|r| saga_proto::record_to_proto(r, false))
                .collect(),
            next_page_token,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<WatchSagasRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = request.into_inner().id;
        let events = self.0.sagas.watch((!id.is_empty()).then_some(id))?;
        let stream = futures_util::StreamExt::map(events, |event| match event {
            Ok(event) => Ok(saga_proto::event_to_proto(&event)),
            Err(message) => Err(Status::data_loss(message)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn abort(&self, request: Request<AbortSagaRequest>) -> Result<Response<Saga>, Status> {
        let request = request.into_inner();
        let record = self.0.sagas.abort(&request.id, &request.reason).await?;
        Ok(Response::new(saga_proto::record_to_proto(&record, true)))
    }
}

/// The gRPC router: checkpoints and reflection behind the token check,
/// health open to probes.
///
/// What no gRPC service takes (another path, a request that is not gRPC)
/// goes to `json`, the JSON API: the gRPC port serves it too.
pub fn router(
    control: Arc<ControlPlane>,
    auth: Auth,
    json: super::http::HttpApi,
) -> tonic::service::Routes {
    let limit = control.max_state_bytes() + (1 << 20);
    let checkpoints = CheckpointsServer::new(CheckpointsService(control.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    // Both reflection versions: grpcurl and most tools speak v1, older
    // ones v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor set is valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor set is valid");
    let sagas = SagasServer::new(SagasService(control.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    // A checkpoint read whole: up to max_state of values and as much of
    // pending writes.
    let threads = ThreadsServer::new(ThreadsService(control.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit + control.max_state_bytes());
    let dead_letters = DeadLettersServer::new(DeadLettersService(control))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let (reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        reporter
            .set_serving::<CheckpointsServer<CheckpointsService>>()
            .await;
        reporter
            .set_serving::<DeadLettersServer<DeadLettersService>>()
            .await;
        reporter.set_serving::<SagasServer<SagasService>>().await;
        reporter
            .set_serving::<ThreadsServer<ThreadsService>>()
            .await;
    });
    fn guard<S>(inner: S, auth: &Auth) -> Guarded<S> {
        Guarded {
            inner,
            auth: auth.clone(),
        }
    }
    let routes = tonic::service::Routes::new(health)
        .add_service(guard(checkpoints, &auth))
        .add_service(guard(dead_letters, &auth))
        .add_service(guard(sagas, &auth))
        .add_service(guard(threads, &auth))
        .add_service(guard(reflection_v1, &auth))
        .add_service(guard(reflection_v1alpha, &auth));
    let fallback = tower::service_fn(move |request: http::Request<_>| {
        let json = json.clone();
        async move {
            let request = request.map(crate::body::boxed);
            json.handle(request).await
        }
    });
    routes.into_axum_router().fallback_service(fallback).into()
}

/// A service behind the token check, which needs the call's path (a read
/// or a change) and so sits where the path is still known, before tonic
/// turns the request into a message.
#[derive(Debug, Clone)]
struct Guarded<S> {
    inner: S,
    auth: Auth,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<::http::Request<B>> for Guarded<S>
where
    S: tower::Service<::http::Request<B>, Response = ::http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        std::future::Ready<Result<Self::Response, Self::Error>>,
        S::Future,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: ::http::Request<B>) -> Self::Future {
        use futures_util::future::Either;
        match self
            .auth
            .check_grpc(request.uri().path(), request.headers())
        {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(status) => Either::Left(std::future::ready(Ok(status.into_http()))),
        }
    }
}
