"""Batches: many executions of one workflow from a list of items, with a concurrency limit,
dedupe, seeds, prompt variants, resume, review states, a manifest and an export."""

from imagegraph.batches.expand import BatchOptions, Item
from imagegraph.batches.service import Batches

__all__ = ["BatchOptions", "Batches", "Item"]
