"""``tweets-instruct``: the offline tweet corpus as instructions for a causal LM.

Same tweets, same held-out validation/test (1000 / 2000 by ``--data-seed``) as ``tweets``. The prompt asks
for the sentiment of the tweet; the response is the label word (negative, neutral, positive).
"""
from __future__ import annotations

from tenslora.train.tasks.base import Rows, Split, TaskData
from tenslora.train.tasks.causal import causal_task
from tenslora.train.tasks.tweets import load_tweets

PROMPT = ("What is the sentiment of this tweet about self-driving cars? "
          "Answer with one word: negative, neutral or positive.\n\nTweet: {text}")


def as_instructions(split: Split) -> Split:
    inputs, labels = split.inputs, [str(v).strip() for v in split.labels]
    return Split(Rows(len(split), lambda i: {"prompt": PROMPT.format(text=inputs[i]["text"]), "response": labels[i]}),
                 labels)


def load_tweets_instruct(cfg) -> TaskData:
    tweets = load_tweets(cfg)
    return causal_task("tweets-instruct", {k: as_instructions(v) for k, v in tweets.splits.items()},
                       label_names=tweets.label_names, validation_size=tweets.validation_size,
                       test_size=tweets.test_size, test_source=tweets.test_source)
