"""Between a loaded model and text: sampling, the continuous-batching engine, generation, chat.

sampling.py picks tokens; engine.py decodes many requests side by side, each row of the cache at its own
length; generate.py is the one-call API on the engine; chat.py fits prompts to the context, keeps chat
sessions and streams text; cpu_kernels.py holds the CPU decoding kernels, swapped into a per-model
decoding view when decoding starts (the model's own modules stay plain).
"""
