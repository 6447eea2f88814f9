"""The COLA paper's experiments: a grid runner resumable cell by cell, and its reports."""
