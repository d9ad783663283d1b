"""Where an expert-parallel decode step's time goes: see `moecluster/cluster/bench/ep_profile.py`.

    python scripts/profile_ep_decode.py --world 2 --preset deepseek-v3 --layers 4 --concurrency 64 --context 2000
"""

from moecluster.cluster.bench.ep_profile import main

if __name__ == "__main__":
    main()
