"""Measuring a router: a store on its test split (`store`), data sets it never saw (`unseen`),
leave-one-group-out (`holdout`) and nested (`nested`) selector accuracy, two kinds' agreement
(`agreement`), judged and human ratings (`judge`), plots. Builds on `routing`; nothing there
imports this package."""
