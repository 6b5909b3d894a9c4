"""Generation for generation bias sets: continuous batching over the runner's engine, many tasks per decode step.

- `sampling.py`  what a request asks of its tokens (`SamplingParams`) and how the next one is picked
                 (greedy, temperature, top_p, a per-request seed);
- `stops.py`     stop sequences: where a text ends, and how much of a growing text is safe to stream;
- `cache.py`     the batch's KV cache as rows: join (left-pad and concatenate), leave (select), trim;
- `scheduler.py` the continuous-batching loop, run one decode step at a time on the runner's worker thread;
- `service.py`   names and limits above it: `task[@version]`, the task's prompt template and stops, no HTTP.

The HTTP routes (`server/http/routes/openai.py`) speak OpenAI's API over `service.py`.
"""
