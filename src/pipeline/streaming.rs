//! The streaming stage: one generation's answer, in rounds. Each round is
//! one streamed upstream call that offers the tools; its content goes out
//! as tokens the moment it arrives, and when it ends with tool calls, the
//! tools run here and the next round gets their results. [`Streaming`]
//! holds what that needs (the provider, the tools and their limits, the
//! way out for tokens) and nothing of the pipeline's bookkeeping: how the
//! generation then ends is the caller's.
//!
//! Threads: [`Streaming::answer`] runs on a streaming worker, one
//! generation per worker; the [`TokenPath`] also runs on whichever thread
//! the provider delivers tokens on (the upstream reader thread for an HTTP
//! upstream).

use std::sync::Arc;

use super::cluster_node::ClusterNode;
use super::cluster_part::ClusterPart;
use super::failures::llm_failure;
use super::records::Generation;
use crate::history::History;
use crate::llm::{Ask, CallLimits, Flow, Prompt, Provider, TokenSink, ToolCall};
use crate::metrics::Metrics;
use crate::protocol::{Finish, Outcome};
use crate::tools::{ToolResult, Toolbox};

/// What the streaming stage needs.
pub(super) struct Streaming {
    provider: Arc<dyn Provider>,
    /// `None` when tools are disabled (or none is enabled).
    toolbox: Option<Toolbox>,
    limits: CallLimits,
    /// Upstream calls per answer at most (`tools.max_rounds`, at least 1).
    rounds: usize,
    /// The conversation the tools read (`search`).
    history: History,
    tokens: Arc<TokenPath>,
    metrics: Arc<Metrics>,
}

/// Where a published token goes: the generation's clients and, on a
/// cluster node that leads it, its stream in Redis.
pub(super) struct TokenPath {
    cluster: Option<Arc<ClusterNode>>,
    metrics: Arc<Metrics>,
}

impl TokenPath {
    /// Hands one token to the generation's clients (and, in a cluster, to
    /// its stream in Redis); false when the generation already ended.
    fn publish(&self, generation: &Generation, token: &str) -> bool {
        if generation.broadcast.publish(token).is_none() {
            return false;
        }
        if let Some(node) = &self.cluster {
            // Only queues: this runs between two tokens.
            if let Some(ClusterPart::Lead(lead)) = generation.cluster.lock().as_mut() {
                lead.append(token, &node.writes);
            }
        }
        self.metrics.tokens.inc();
        true
    }
}

impl Streaming {
    pub(super) fn new(
        provider: Arc<dyn Provider>,
        toolbox: Option<Toolbox>,
        config: &crate::config::ToolsConfig,
        history: History,
        cluster: Option<Arc<ClusterNode>>,
        metrics: Arc<Metrics>,
    ) -> Streaming {
        Streaming {
            provider,
            toolbox,
            limits: CallLimits {
                max_calls: config.max_calls,
                max_argument_bytes: config.max_argument_bytes,
            },
            rounds: config.max_rounds.max(1),
            history,
            tokens: Arc::new(TokenPath {
                cluster,
                metrics: metrics.clone(),
            }),
            metrics,
        }
    }

    /// The provider, for its statistics.
    pub(super) fn provider(&self) -> &dyn Provider {
        &*self.provider
    }

    /// The rounds of `generation`'s answer to `prompt`. At most
    /// `tools.max_rounds` calls, the last one without tools, so a model
    /// that keeps calling tools still has to answer. `conversation` is the
    /// one the tools may read; `None` offers the model no tools (a prompt
    /// the client brought whole).
    pub(super) fn answer(
        &self,
        generation: &Arc<Generation>,
        prompt: &mut Prompt,
        conversation: Option<&str>,
    ) -> Outcome {
        let toolbox = self.toolbox.as_ref().filter(|_| conversation.is_some());
        let specs = toolbox.map_or(&[][..], |t| t.specs());
        let sink: TokenSink = {
            let path = self.tokens.clone();
            let generation = generation.clone();
            Arc::new(move |token: &str| {
                if path.publish(&generation, token) {
                    Flow::Continue
                } else {
                    // The generation was ended from outside (timeout, cancel).
                    Flow::Stop
                }
            })
        };
        let mut round = 1;
        let mut endpoint = None;
        loop {
            let last = round >= self.rounds;
            let ask = Ask {
                prompt,
                tools: if last { &[] } else { specs },
                limits: self.limits,
                // From the second round on, tool frames went out.
                committed: round > 1,
                endpoint,
            };
            self.metrics.upstream_calls.inc();
            let turn = match self.provider.stream(&ask, &generation.abort, &sink) {
                Ok(turn) => turn,
                Err(e) => {
                    log::warn!("generation {} failed: {e}", generation.id);
                    return Err(llm_failure(&e));
                }
            };
            endpoint = Some(turn.endpoint);
            if let Some(usage) = turn.usage {
                let mut st = generation.state.lock();
                st.usage = Some(st.usage.unwrap_or_default().plus(usage));
            }
            let finished = turn.end;
            if finished == Finish::Cancelled {
                // Whoever aborted already set the outcome; this is a fallback.
                return Ok(finished);
            }
            let (toolbox, conversation) = match (toolbox, conversation) {
                (Some(toolbox), Some(conversation)) if !turn.tool_calls.is_empty() && !last => {
                    (toolbox, conversation)
                }
                _ => {
                    if !turn.tool_calls.is_empty() {
                        log::info!(
                            "generation {}: the model called tools when none were offered; ignored",
                            generation.id
                        );
                    }
                    return Ok(finished);
                }
            };
            let results = self.run_tools(toolbox, generation, conversation, &turn.tool_calls);
            if let Some(direct) = results.iter().find(|r| r.direct && r.result.is_ok()) {
                // A direct tool answered: its text is the answer, word by
                // word, and the model is not asked again.
                for piece in direct.text().split_inclusive(' ') {
                    if !self.tokens.publish(generation, piece) {
                        break;
                    }
                }
                return Ok(Finish::Stop);
            }
            prompt
                .messages
                .extend(crate::tools::round_messages(turn.said, &results));
            // The tools' time is not the upstream's silence.
            generation.mark_progress();
            round += 1;
        }
    }

    /// Runs the tool calls of a round, showing each call, output and
    /// result to the generation's clients.
    fn run_tools(
        &self,
        toolbox: &Toolbox,
        generation: &Arc<Generation>,
        conversation: &str,
        calls: &[ToolCall],
    ) -> Vec<ToolResult> {
        self.metrics.tool_calls.inc_by(calls.len() as u64);
        for call in calls {
            generation.tool_frame(&call.name, "call", &call.arguments);
        }
        let results = toolbox.run(calls, conversation, &self.history, &|call, text| {
            generation.tool_frame(&call.name, "output", text)
        });
        for result in &results {
            generation.tool_frame(&result.call.name, "result", &result.text());
        }
        if results.iter().any(|r| !r.cacheable) {
            generation.state.lock().cacheable = false;
        }
        results
    }
}
