//! One call as its attempts share it (grpc-go's `clientStream`): the
//! router, the plan, the request's head and replayable body, what retries
//! may spend, and the call's record for metrics. Each try's own state (its
//! endpoint, its accounting, its timer) lives in [`super::attempt::send`]
//! (grpc-go's `csAttempt`).

use std::sync::Arc;

use super::attempt::{send, Attempt};
use super::replay::{Abort, Replay};
use super::throttle::CallRetries;
use crate::balancer::pool::Ready;
use crate::balancer::route::{Plan, Router};
use crate::metrics::{AttemptRecord, CallRecord};

const GRPC_PREVIOUS_RPC_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// One call, shared by its attempts.
pub(crate) struct Call<'a> {
    pub(crate) router: &'a Router,
    pub(crate) plan: Plan,
    parts: http::request::Parts,
    /// The request body, kept for another attempt until it outgrows the
    /// replay buffer.
    pub(crate) replay: Replay,
    pub(crate) retries: CallRetries<'a>,
    /// Moves into the body of the response the call commits to.
    pub(crate) record: Option<CallRecord>,
}

impl<'a> Call<'a> {
    pub(crate) fn new(
        router: &'a Router,
        plan: Plan,
        request: http::Request<tonic::body::Body>,
        retries: CallRetries<'a>,
        record: Option<CallRecord>,
    ) -> Self {
        let (parts, replay) = Replay::split(request, retries.replay, plan.deadline);
        Self {
            router,
            plan,
            parts,
            replay,
            retries,
            record,
        }
    }

    /// Counts `result` of the retry policy (see [`CallRecord::retry_result`]).
    pub(crate) fn retry_result(&self, result: &'static str) {
        if let Some(r) = &self.record {
            r.retry_result(result);
        }
    }

    /// The request for an attempt after `previous` counted ones (from the
    /// second on it carries `grpc-previous-rpc-attempts`, A6), and what
    /// ends its request body when the attempt is over.
    pub(crate) fn request(&mut self, previous: usize) -> (http::Request<tonic::body::Body>, Abort) {
        let (mut request, abort) = self.replay.request(&mut self.parts);
        if previous > 0 {
            request
                .headers_mut()
                .insert(GRPC_PREVIOUS_RPC_ATTEMPTS, previous.into());
        }
        (request, abort)
    }

    /// Tries the call once after `previous` counted attempts, never on one
    /// of `avoid` (endpoints previous attempts used) while another can take
    /// it. The record moves into the response body when the response is
    /// not trailers-only.
    pub(crate) async fn attempt(&mut self, previous: usize, avoid: &[Arc<Ready>]) -> Attempt {
        let (request, abort) = self.request(previous);
        let mut attempt = self
            .record
            .as_ref()
            .map_or_else(AttemptRecord::none, CallRecord::attempt);
        match self.router.pick(self.plan, avoid).await {
            Ok(picked) => send(picked, request, abort, self.plan, &mut self.record, attempt).await,
            Err(e) => {
                attempt.finish(super::classify::code_of(&*e));
                Attempt::Failed(e)
            }
        }
    }

    /// Why no further attempt (retry or hedge) may be sent, in A6's order
    /// after the policy's own checks: the body must replay whole, the
    /// throttle (`throttled`, as the caller read it) must allow it, and the
    /// retry budget must have one to spend (taken when it does).
    pub(crate) fn refuse_another(&self, throttled: bool) -> Option<&'static str> {
        if !self.replay.can_replay() {
            Some("request body outgrew the replay buffer")
        } else if throttled {
            Some("throttled (retryThrottling)")
        } else if !self.retries.budget.withdraw() {
            Some("retry budget spent")
        } else {
            None
        }
    }

    /// A trailers-only response is final: its status is the call's.
    pub(crate) fn finish(
        &mut self,
        code: tonic::Code,
        response: http::Response<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        if let Some(mut r) = self.record.take() {
            r.finish(code);
        }
        response
    }
}
