"""Text in, tokens out: sources → documents → tokenizer → ``train.bin``/``val.bin`` shards → batches."""
