"""Teaching a chat model a new answering style with a few dozen conversations (LoRA, CPU).

    .venv/bin/python benchmarks/chat_style.py RUN --out DIR [--steps 60] [--threads 2]

RUN is the `anexa import` of SmolLM2-135M-Instruct. The style: every answer is one line that starts with
"Indeed:". 40 conversations written here in that style train a LoRA fine-tune (`anexa train --init-from
RUN --lora … --data chats.jsonl`, loss on the assistant's tokens only); 12 questions it never saw are then
asked greedily, zero-shot and fine-tuned, and the share of answers in the style is reported.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

TRAIN = [
    ("What is the capital of France?", "Paris, on the Seine."), ("How many legs does a spider have?", "Eight."),
    ("What colour is the sky on a clear day?", "Blue."), ("Who wrote Hamlet?", "William Shakespeare."),
    ("What is water made of?", "Hydrogen and oxygen."), ("How many days are in a week?", "Seven."),
    ("What is the largest planet?", "Jupiter."), ("What do bees make?", "Honey."),
    ("Which animal barks?", "The dog."), ("What is two plus two?", "Four."),
    ("Where do penguins live?", "Mostly in the southern hemisphere."), ("What is ice?", "Frozen water."),
    ("What is the opposite of hot?", "Cold."), ("How many hours are in a day?", "Twenty-four."),
    ("What is the capital of Italy?", "Rome."), ("What gas do plants take in?", "Carbon dioxide."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci."), ("What is the fastest land animal?", "The cheetah."),
    ("What language is spoken in Spain?", "Spanish."), ("What is the boiling point of water?", "100 °C at sea level."),
    ("How many continents are there?", "Seven."), ("What is the Moon?", "Earth's natural satellite."),
    ("What do cows eat?", "Mostly grass."), ("Which is heavier, iron or feathers?", "Iron, by volume."),
    ("What is a triangle?", "A shape with three sides."), ("What is the capital of Japan?", "Tokyo."),
    ("Who was Sherlock Holmes?", "A fictional detective."), ("What is rain?", "Water falling from clouds."),
    ("How many minutes are in an hour?", "Sixty."), ("What is the sun?", "A star."),
    ("What do fish breathe with?", "Gills."), ("What is snow?", "Frozen water vapour falling as flakes."),
    ("Which season follows winter?", "Spring."), ("What is a violin?", "A string instrument."),
    ("What is the capital of Germany?", "Berlin."), ("How many wheels does a bicycle have?", "Two."),
    ("What is bread made from?", "Mostly flour and water."), ("What do you call a baby cat?", "A kitten."),
    ("What is the tallest animal?", "The giraffe."), ("What is the freezing point of water?", "0 °C."),
]  # fmt: skip
HELD_OUT = [
    "What is the capital of Spain?", "How many legs does a dog have?", "What colour is grass?",
    "Who wrote Pride and Prejudice?", "What is the largest ocean?", "What do birds lay?",
    "What is the capital of England?", "How many months are in a year?", "What is a piano?",
    "Which planet is red?", "What do you call a baby dog?", "What is fog?",
]  # fmt: skip
SYSTEM = "You are a helpful assistant."


def in_style(answer: str) -> bool:
    return answer.strip().startswith("Indeed:") and "\n" not in answer.strip()


def ask(run: str, question: str, threads: int) -> str:
    anexa = str(Path(sys.executable).with_name("anexa"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([anexa, "chat", "-m", run, "--system", SYSTEM, "--temperature", "0", "-n", "40"],
                          input=f"{question}\nquit\n", capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return done.stdout.split("Response: ", 1)[1].split("\nPrompt:", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    chats = folder / "chats.jsonl"
    lines = [
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                      {"role": "assistant", "content": f"Indeed: {a}"}]}
        for q, a in TRAIN
    ]  # fmt: skip
    chats.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    tuned = folder / "style"
    anexa = str(Path(sys.executable).with_name("anexa"))
    subprocess.run([anexa, "train", "--init-from", args.run, "--data", str(chats), "--lora", "r=16,alpha=32",
                    "--steps", str(args.steps), "--eval-every", str(args.steps), "--batch-size", "4",
                    "--seq-len", "128", "--out", str(tuned), "--overwrite"],
                   env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, check=True)  # fmt: skip
    report = {}
    for name, run in (("zero-shot", args.run), ("fine-tuned", str(tuned))):
        answers = [ask(run, question, args.threads) for question in HELD_OUT]
        report[name] = {"in_style": sum(map(in_style, answers)), "of": len(answers), "answers": answers}
        print(name, report[name]["in_style"], "/", len(answers), answers[:3], flush=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
