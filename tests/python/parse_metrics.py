"""Parses the OpenMetrics text on stdin with the official Prometheus client's strict parser and
prints each sample as one JSON object: {"<name>{<labels as sorted JSON>}": value}.

A text the parser refuses makes it exit non-zero with the parser's message."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> None:
    samples = {}
    for family in text_string_to_metric_families(sys.stdin.read()):
        for sample in family.samples:
            labels = json.dumps(dict(sorted(sample.labels.items())), separators=(",", ":"))
            samples[sample.name + labels] = sample.value
    json.dump(samples, sys.stdout)


if __name__ == "__main__":
    main()
