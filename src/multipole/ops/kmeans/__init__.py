from .reference import KMeansResult, assign, cluster_means, hash_uniform, kmeans, kmeans_objective

__all__ = ["KMeansResult", "assign", "cluster_means", "hash_uniform", "kmeans", "kmeans_objective"]
