"""Reference point for the default task: TF-IDF + logistic regression on maskrun's own split.

    .venv/bin/python scripts/baseline_tfidf.py [dataset=rotten_tomatoes]
"""

import json
import sys

from hydra import compose, initialize_config_module
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from maskrun.data import load_task


def main(overrides: list[str]) -> dict:
    with initialize_config_module("maskrun.conf", version_base="1.3"):
        cfg = compose("config", overrides)
    task = load_task(cfg.dataset, cfg.dataset.split_seed)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    classifier = LogisticRegression(max_iter=2000, C=4.0)
    classifier.fit(vectorizer.fit_transform(task.train.texts), task.train.labels)
    pred = classifier.predict(vectorizer.transform(task.test.texts))
    return {
        "task": task.name,
        "split_sizes": task.split_sizes,
        "test_accuracy": accuracy_score(task.test.labels, pred),
        "test_macro_f1": f1_score(task.test.labels, pred, average="macro"),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
