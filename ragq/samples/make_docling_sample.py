"""Rebuild celery-queues.json, the DoclingDocument sample, with docling-core's API: python make_docling_sample.py"""

from pathlib import Path

from docling_core.types.doc import DocItemLabel, DoclingDocument

SECTIONS = {
    "Two queues with their own exchanges": [
        "ragq sends work to two Celery queues, urgent and background, each bound to its own exchange. "
        "Ingestion batches go to the background queue and questions go to the urgent queue.",
        "Workers consume both queues with the urgent queue listed first, so that urgent messages are fetched first.",
    ],
    "Settings that keep urgent questions fast": [
        "With the Redis transport option queue_order_strategy set to priority, a worker always empties the urgent "
        "queue before it takes a background message. With the default round-robin order, urgent tasks interleave "
        "with background ones.",
        "A prefetch multiplier of 1 together with late acknowledgement means a worker reserves only the tasks it "
        "is running, so an urgent question waits for at most the tasks already reserved and never behind the "
        "whole ingestion backlog.",
        "The visibility timeout must be longer than the longest task, or Redis redelivers a task that is still "
        "running.",
    ],
    "Serialisation": [
        "Only JSON is accepted. Pickle from a broker would let anyone who can write to Redis run code on the worker.",
    ],
    "Synchronous questions": [
        "An urgent question is a synchronous remote procedure call: the client publishes a chain with an expiry and "
        "waits for the result with a timeout. A question whose caller has gone is dropped before it costs GPU time.",
    ],
}


def build() -> DoclingDocument:
    doc = DoclingDocument(name="celery-queues")
    doc.add_title(text="Priority queues for RAG workloads")
    for heading, paragraphs in SECTIONS.items():
        doc.add_heading(text=heading, level=1)
        for paragraph in paragraphs:
            doc.add_text(label=DocItemLabel.PARAGRAPH, text=paragraph)
    return doc


if __name__ == "__main__":
    build().save_as_json(Path(__file__).with_name("celery-queues.json"))
